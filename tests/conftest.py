import os
import sys

import torch


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
