"""The graded tests import the copy of the repository they sit in (two folders up), on the CPU."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # no GPU needed, none used
