import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("ftq_weight_only") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
