import os

import torch


# The checkout and scripts/ (compressssm_app, the scripts as modules) are on sys.path: pyproject.toml's pytest
# `pythonpath`.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
