import argparse
import sys
from pathlib import Path

from tether.demo._scenario import run

parser = argparse.ArgumentParser(prog="python -m tether.demo")
parser.add_argument("--once", action="store_true", help="exit when the scenario ends")
parser.add_argument("--examples", type=Path, default=Path("examples/demo"))
parser.add_argument("--home", type=Path, default=None, help="keep the demo's Tether home here")
parser.add_argument("--port", type=int, default=8700, help="preferred port on 127.0.0.1")
options = parser.parse_args()
try:
    code = run(examples=options.examples, home=options.home, once=options.once, port=options.port)
except KeyboardInterrupt:  # Ctrl-C during the scenario: the servers are already stopped
    print("interrupted", file=sys.stderr)
    code = 130
sys.exit(code)
