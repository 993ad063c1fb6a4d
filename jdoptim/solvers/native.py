r"""A compiled primal active-set solver for the CPU's small dual-cone problems.

Every row :math:`u` of the dual-cone problem (:mod:`jdoptim.solvers.dual_cone`) becomes, with
:math:`v = u + s` and :math:`c = \hat G u`, a non-negative quadratic program

.. math:: \min_{s \ge 0} \tfrac12 s^\top \hat G s + c^\top s,
    \qquad \lambda = \hat G s + c \ge 0, \quad \lambda \odot s = 0 .

:file:`_nnqp.c` solves it by the primal active-set method (Nocedal & Wright, *Numerical
Optimization*, algorithm 16.3) on bounds: from :math:`s = 0` and a guessed free set, it moves
towards the minimiser of the face of free indices and stops at the first bound it crosses, which
becomes active again; at a face's minimiser it frees every bound of negative multiplier at once
(a descent direction still), and stops when there is none. The objective decreases at every step
and no face is visited twice, so the method ends, in exact arithmetic, at the solution (5-14
steps a row on the test bank at m = 32-64). Each face is solved from the smaller side: from the
free side with a Cholesky factor of :math:`\hat G_{FF}` (one row appended per freed index, one
removed by a rank-one update per blocked one), or, given :math:`H = \hat G^{-1}`, from the
active side, since :math:`\hat G v = \lambda` with :math:`\lambda_F = 0` and :math:`v_A = u_A`
give :math:`\lambda_A = H_{AA}^{-1} u_A` and :math:`v_F = H_{FA} \lambda_A` (per-sample
Gramians: few active bounds; the factor of :math:`H_{AA}` is updated the same way). The whole
batch of ``k`` rows runs in one call, with no per-operation dispatch, which is what the torch
pivoting pays for at small ``m`` (about 250 operations of 3-8 us at m = 32).

**Checked, never trusted.** The source is compiled once per machine with the system's C compiler
(``$CC``, else ``cc``/``gcc``/``clang``) into ``$JDOPTIM_CACHE`` (default ``~/.cache/jdoptim``;
where that cannot be written, a private ``<tmp>/jdoptim-<uid>``). A row that takes more than
``max_steps`` steps (rounding can make a step repeat) or whose factorisation fails is reported;
the caller checks every other row with :func:`certify` (the bound of
:func:`~jdoptim.solvers.active_set.certify`, computed from the result alone: a product in
torch, the rest in its own C function, not in the method's code path) and solves the rest with
the torch solver. Without a compiler, or with ``JDOPTIM_NATIVE=0``,
:func:`available` is false and the torch solver runs alone (same results to rounding).

>>> import torch
>>> G = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64)
>>> if available():
...     x, ok = solve(G, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
... else:
...     x, ok = torch.tensor([[1.0, 0.5]], dtype=torch.float64), torch.tensor([True])
>>> x, ok
(tensor([[1.0000, 0.5000]], dtype=torch.float64), tensor([True]))
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("_nnqp.c")
_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c99")
_state: dict[str, object] = {}


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cache_dir() -> Path:
    root = os.environ.get("JDOPTIM_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "jdoptim"


def _private_temp_dir() -> Path:
    """``<tmp>/jdoptim-<uid>``, created private (0700); refused (``PermissionError``) unless it
    belongs to this user and nobody else can write to it (a library loaded from a shared
    directory must not be replaceable by another user)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    path = Path(tempfile.gettempdir()) / f"jdoptim-{uid}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if path.is_symlink() or info.st_uid != uid or info.st_mode & 0o022:
        raise PermissionError(f"{path} is not a private directory of this user")
    return path


def _compile_into(directory: Path, cc: str, name: str) -> Path:
    target = directory / name
    if not target.exists():
        directory.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name and renamed: processes building at once (distributed
        # ranks) each rename a complete library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
        try:
            subprocess.run(
                [cc, *_FLAGS, str(_SOURCE), "-o", tmp, "-lm"],
                check=True,
                capture_output=True,
                timeout=120,
            )
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return target


def _build() -> ctypes.CDLL | None:
    if os.environ.get("JDOPTIM_NATIVE", "1") == "0" or sys.platform == "win32":
        return None
    cc = _compiler()
    if cc is None:
        return None
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((cc, *_FLAGS)).encode()).hexdigest()[:16]
    name = f"nnqp-{key}-{platform.machine()}.so"
    try:
        target = _compile_into(_cache_dir(), cc, name)
    except OSError:  # a read-only home (some clusters): a private temporary directory
        target = _compile_into(_private_temp_dir(), cc, name)
    lib = ctypes.CDLL(str(target))
    fn = lib.jdoptim_nnqp
    fn.restype = None
    fn.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 5
    fn.argtypes += [ctypes.c_double, ctypes.c_int] + [ctypes.c_void_p] * 4
    cert = lib.jdoptim_certify
    cert.restype = None
    cert.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 4
    cert.argtypes += [ctypes.c_double, ctypes.c_double] + [ctypes.c_void_p] * 2
    return lib


def _library() -> ctypes.CDLL | None:
    if "lib" not in _state:
        try:
            _state["lib"] = _build()
        except (OSError, subprocess.SubprocessError) as error:
            warnings.warn(
                f"jdoptim could not build its native dual-cone solver ({error}); the torch "
                "solver runs instead (same results, slower at small m).",
                RuntimeWarning,
                stacklevel=3,
            )
            _state["lib"] = None
    return _state["lib"]  # type: ignore[return-value]


def _loaded_library() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("jdoptim's native solver is not available (see `native.available`).")
    return lib


def available() -> bool:
    """The compiled solver is built and loaded (see the module docstring)."""
    return _library() is not None


def max_steps(m: int) -> int:
    """Steps allowed per row: ``3m + 10`` (the solution frees at most ``m`` indices; each
    step frees or fixes one)."""
    return 3 * m + 10


def _readable(t: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """``t`` as a contiguous tensor of ``dtype`` (itself when it already is: no dispatch)."""
    if t.dtype == dtype and t.is_contiguous():
        return t
    return t.to(dtype).contiguous()


def solve(
    gramian: Tensor,
    lower: Tensor,
    start: Tensor | None = None,
    products: Tensor | None = None,
    rtol: float = 1e-15,
) -> tuple[Tensor, Tensor]:
    r"""Solve :math:`\min_{v \ge u} \tfrac12 v^\top \hat G v` for every row ``u`` of ``lower``
    (``[k, m]``, float64, CPU) with the compiled active-set method; ``gramian`` must be
    positive definite. ``start`` (``[k, m]`` boolean, optional): indices freed before the first
    step (a warm start). ``products`` (optional): ``lower @ gramian`` when the caller has it.
    A bound is freed while its multiplier is below ``-rtol ||u||_2``. Returns the rows and a
    ``[k]`` mask of the rows the method finished (the others hold garbage: solve them another
    way). The finished rows are exact solutions of the face they end on; check them
    (``certify``) before use."""
    lib = _loaded_library()
    k, m = lower.shape
    G, U = _readable(gramian), _readable(lower)  # read through data pointers (no autograd)
    C = U @ G if products is None else _readable(products)
    H = None
    if start is not None:
        start = _readable(start, torch.bool)  # one byte per entry, read as unsigned char
        if 2 * int(start.sum(-1).max()) > m:  # some rows start with few active bounds
            factor, info = torch.linalg.cholesky_ex(G)
            if int(info) == 0:  # else (not finite, say) every row works from the free side
                H = torch.cholesky_inverse(factor).contiguous()
    X = torch.empty_like(U)
    steps = torch.empty(k, dtype=torch.int32)
    work = torch.empty(m * m + 4 * m, dtype=torch.float64)
    iwork = torch.empty(2 * m, dtype=torch.int32)
    lib.jdoptim_nnqp(
        k,
        m,
        G.data_ptr(),
        None if H is None else H.data_ptr(),
        U.data_ptr(),
        C.data_ptr(),
        None if start is None else start.data_ptr(),
        rtol,
        max_steps(m),
        X.data_ptr(),
        steps.data_ptr(),
        work.data_ptr(),
        iwork.data_ptr(),
    )
    return X, steps >= 0


def certify(gramian: Tensor, lower: Tensor, x: Tensor, mu: float, rtol: float) -> Tensor:
    r""":func:`~jdoptim.solvers.active_set.certify` (same bound, same arguments, float64 CPU
    tensors) with its element-wise work compiled: torch computes :math:`X \hat G`, the C code
    the snapping, the clamped residual and the norms of every row in one pass (at m = 64 the
    torch version is a dozen operations, 80-90 us; this one a product and a call). Rows with a
    non-finite entry are not certified. Returns a ``[k]`` boolean tensor."""
    lib = _loaded_library()
    k, m = lower.shape
    G, U, X = _readable(gramian), _readable(lower), _readable(x)
    R = X @ G
    ok = torch.empty(k, dtype=torch.bool)
    work = torch.empty(2 * m, dtype=torch.float64)
    lib.jdoptim_certify(
        k,
        m,
        G.data_ptr(),
        U.data_ptr(),
        X.data_ptr(),
        R.data_ptr(),
        mu,
        rtol,
        ok.data_ptr(),
        work.data_ptr(),
    )
    return ok
