# Puts this checkout first on sys.path, so tests in any worktree run that worktree's code.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
