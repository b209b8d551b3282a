"""What every ditmerge CLI shares: logging set-up and the user-error boundary."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from passes.errors import DitmergeError


def run_cli(main: Callable[[], None], verbose: bool = False) -> int:
    """Run ``main``; a DitmergeError prints as one line without a traceback and exits 1."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch", "torch.onnx", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t0 = time.perf_counter()
    try:
        main()
    except DitmergeError as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"FAILED | Runtime: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"PASSED | Runtime: {time.perf_counter() - t0:.1f}s")
    return 0
