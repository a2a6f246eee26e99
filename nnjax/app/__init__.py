"""Floor 5, applications: the ``nnjax`` command line and its demo."""
