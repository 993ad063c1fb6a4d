"""``interp_kernels.py`` only runs with ``TRITON_INTERPRET=1`` (``test_kernels.py`` starts it
in a subprocess); keep it out of plain runs, doctest collection included."""

import os

collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interp_kernels.py"]
