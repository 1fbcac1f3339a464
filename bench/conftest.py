import os
import sys

# bench/ modules (timing, layer_cases) import each other by plain name.
sys.path.insert(0, os.path.dirname(__file__))
