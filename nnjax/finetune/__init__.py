"""Fine-tuning: masks over parameter paths, presets, per-group optimizers, adapters, surgery.

``import nnjax as nj``; ``nj.finetune.mask(params, "head/**")``. Everything here
builds or reads a mask (True = trainable) or a params tree; the trainer takes
the mask as a plain bool pytree (``nj.trainer(..., trainable=mask)``).

What a user calls:

Masks from path globs:
    mask, union, intersect, invert, report, trainable_count, trainable_bytes,
    map_copies (a value per logical path).
Presets:
    head_only, bias_only, norms_only, last_k_blocks, progressive_unfreezing,
    block_names.
Per-group optimizers:
    multi_optimizer, labels, layerwise_lr_decay, layerwise_scales, scale_by_tree.
Adapters (LoRA, IA3, DoRA):
    add_lora, add_ia3, add_dora, merge_adapters, merge_lora, merge_ia3, merge_dora,
    save_adapters, load_adapters, adapter_params, adapter_mask, remove_adapters.
Quantized bases (frozen kernels stored in fewer bits, adapters trained beside them):
    quantize, dequantize, Quantization (quantize's arguments as one value, which
    nj.models.hf.from_pretrained(..., quantize=) takes), quantize_leaf (one array).
Changing a model:
    load_pretrained, replace_head.
What a step costs:
    step_cost, count_primitives, memory_table.
"""

from nnjax.finetune.adapters import *
from nnjax.finetune.cost import *
from nnjax.finetune.groups import *
from nnjax.finetune.masks import *
from nnjax.finetune.presets import *
from nnjax.finetune.quantization import *
from nnjax.finetune.surgery import *
