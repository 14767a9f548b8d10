"""Hostile-input catalogue of the readers (issue 13, class "Readers"): files that are not regular files, bytes that
trip the parsers in ways their authors did not list, nesting and size bombs. Each case runs in its own Python process
(under a memory limit and a timeout, so a reader that hangs or eats memory fails its case, not the run) and must give
exit code 2 with one error line naming the file, the inputs unchanged, nothing written, memory bounded.

`python tests/test_hostile_readers.py` prints the figures of the whole catalogue (cases, clear, tracebacks, hangs,
unbounded memory, data lost, silent bad data) without failing on any."""

import functools
import gzip
import hashlib
import io
import json
import os
import re
import resource
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model
from PIL import Image

from qandc.model import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 30  # a case still running then hangs
MEMORY_LIMIT = 6 << 30  # address space of a case's process: what a bomb may reach before it fails
BOMB_BYTES = 768 << 20  # what the size bombs unpack to
# the child's own peak: Linux keeps the forked parent's peak across exec, so the high-water mark is reset first
CHILD = """
import atexit, sys
open("/proc/self/clear_refs", "w").write("5")
atexit.register(lambda: print("MAXRSS", next(line.split()[1] for line in open("/proc/self/status")
                                             if line.startswith("VmHWM")), file=sys.stderr))
from qandc.errors import QandcError
try:
{body}
except QandcError as e:
    print(f"qandc: error: {{e}}", file=sys.stderr)
    sys.exit(2)
"""


@dataclass
class Case:
    name: str
    kind: str  # the hostile-input class
    does: str  # what the case feeds
    setup: Callable  # (tmp) -> (python statements run in the child, the path the message must name, problem regex)


def _cli(*argv) -> str:
    return f"    from qandc.cli import main\n    sys.exit(main({list(map(str, argv))!r}))"


def _call(module: str, expression: str) -> str:
    return f"    from {module} import *\n    from pathlib import Path\n    {expression}\n    sys.exit(0)"


def _generate(checkpoint, *extra, out) -> str:
    return _cli("generate", "--checkpoint", checkpoint, "--labels", "1", "--steps", "2", *extra, "--out", out)


def _checkpoint(tmp: Path) -> Path:
    save_checkpoint(tiny_model(guidance="all"), tmp / "m.pt")
    return tmp / "m.pt"


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _deep_json(depth: int = 100_000) -> bytes:
    return b'{"model": ' + b"[" * depth + b"]" * depth + b"}"


def _zip_bomb_npz(path: Path, size: int) -> None:
    """An .npz whose one member is a valid uint8 array of `size` zeros, deflated (a few MB on disk)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (size,)})
    header = header.getvalue()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("images.npy", "w", force_zip64=True) as member:
            member.write(header)
            zero = bytes(1 << 24)
            for _ in range(size // len(zero)):
                member.write(zero)


def _npz_declaring(path: Path, shape: tuple, descr: str = "<f8", name: str = "images") -> None:
    """An .npz whose array `name` declares `shape` in its header over 64 bytes of data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}.npy", header.getvalue() + bytes(64))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height grey pixels over a few bytes of data."""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


def _png_folder(tmp: Path, bad_name: str, bad: bytes) -> Path:
    folder = tmp / "pngs"
    folder.mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(folder / "0_a.png")
    (folder / bad_name).write_bytes(bad)
    return folder


def _idx_gz_bomb(folder: Path, size: int) -> None:
    """Fashion-MNIST files whose train images gz unpacks to `size` bytes (an IDX header declaring 28x28 images)."""
    folder.mkdir()
    count = size // 784
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (count, 28, 28))
    packer = zlib.compressobj(1, zlib.DEFLATED, 31)
    with open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(packer.compress(header))
        zero = bytes(1 << 24)
        for _ in range(size // len(zero)):
            f.write(packer.compress(zero))
        f.write(packer.flush())
    labels = bytes([0, 0, 8, 1]) + (4).to_bytes(4, "big") + bytes(4)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))


def _ckpt_bytes(hex_bytes: str, problem: str = "not a readable PyTorch checkpoint"):
    def setup(tmp):
        checkpoint = _checkpoint(tmp)
        checkpoint.write_bytes(bytes.fromhex(hex_bytes))
        return _generate(checkpoint, out=tmp / "out"), checkpoint, problem
    return setup


def _ckpt_zip_bomb(tmp):
    """A checkpoint whose one storage, 768 MB of zeros, is deflated to under 1 MB (torch's zip reader inflates it)."""
    import torch

    torch.save({"x_embedder.proj.weight": torch.zeros(BOMB_BYTES // 4)}, tmp / "plain.pt")
    with zipfile.ZipFile(tmp / "plain.pt") as plain, zipfile.ZipFile(tmp / "b.pt", "w", zipfile.ZIP_DEFLATED) as bomb:
        for info in plain.infolist():
            with plain.open(info) as src, bomb.open(info.filename, "w", force_zip64=True) as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
    (tmp / "plain.pt").unlink()
    return _generate(tmp / "b.pt", out=tmp / "out"), tmp / "b.pt", "decompression bomb"


def _ckpt_fifo(tmp):
    path = _fifo(tmp / "f.pt")
    return _generate(path, out=tmp / "out"), path, "not a regular file"


def _ckpt_device(tmp):
    (tmp / "z.pt").symlink_to("/dev/zero")
    return _generate(tmp / "z.pt", out=tmp / "out"), tmp / "z.pt", "not a regular file"


def _sidecar(content: Callable[[Path], None], problem: str):
    def setup(tmp):
        checkpoint = _checkpoint(tmp)
        (tmp / "m.json").unlink()
        content(tmp / "m.json")
        return _generate(checkpoint, out=tmp / "out"), tmp / "m.json", problem
    return setup


def _plan(content: Callable[[Path], None], problem: str):
    def setup(tmp):
        checkpoint = _checkpoint(tmp)
        content(tmp / "plan.json")
        return _generate(checkpoint, "--cache", tmp / "plan.json", out=tmp / "out"), tmp / "plan.json", problem
    return setup


def _diffusers(file: str, content: Callable[[Path], None], problem: str):
    def setup(tmp):
        folder = tmp / "dit"
        folder.mkdir()
        ints = dict.fromkeys(("num_attention_heads", "attention_head_dim", "num_layers", "sample_size", "patch_size",
                              "num_embeds_ada_norm"), 1)
        (folder / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel", **ints}))
        (folder / "w.safetensors").write_bytes(b"")
        (folder / file).unlink()
        content(folder / file)
        return _generate(folder, out=tmp / "out"), folder / file, problem
    return setup


def _eval_npz(content: Callable[[Path], None], problem: str):
    def setup(tmp):
        content(tmp / "s.npz")
        return _cli("eval", "--samples", tmp / "s.npz", "--out", tmp / "eval.json"), tmp / "s.npz", problem
    return setup


def _eval_png(bad: bytes, problem: str):
    def setup(tmp):
        folder = _png_folder(tmp, "1_b.png", bad)
        return _cli("eval", "--samples", folder, "--out", tmp / "eval.json"), folder / "1_b.png", problem
    return setup


def _eval_generated_config(content: Callable[[Path], None], problem: str):
    def setup(tmp):
        folder = tmp / "gen"
        folder.mkdir()
        np.savez(folder / "samples.npz", samples=np.zeros((2, 4, 16, 16), np.float32))
        content(folder / "config.json")
        return _cli("eval", "--samples", folder, "--out", tmp / "eval.json"), folder / "config.json", problem
    return setup


def _pool(content: Callable[[Path], None], problem: str):
    def setup(tmp):
        (tmp / "pool").mkdir()
        (tmp / "pool" / "pool.json").write_text("{}")
        content(tmp / "pool" / "pool.npz")
        folder = tmp / "pool"
        return _call("qandc.calibration.pool", f"Pool.load(Path({str(folder)!r}))"), folder / "pool.npz", problem
    return setup


def _reader(file: str, module: str, call: str):
    """Cases of a reader called as `call` (with {path}) on a file named `file` that `content` makes."""
    def case(content: Callable[[Path], None], problem: str):
        def setup(tmp):
            path = tmp / file
            content(path)
            return _call(module, call.format(path=repr(str(path)))), path, problem
        return setup
    return case


_selection = _reader("selection-tap.json", "qandc.calibration.selection", "read_selection({path}, 4)")
_onnx = _reader("full.ort.onnx", "qandc.engines.onnxruntime_backend",
                "OrtEngine(Path({path}), GraphSpec('full', (), ()))")
_exported = _reader("full.pt2", "qandc.engines.inductor_backend", "InductorEngine(Path({path}), None, compile=False)")


def _fmnist_bomb(tmp):
    _idx_gz_bomb(tmp / "fmnist", BOMB_BYTES)
    path = tmp / "fmnist" / "train-images-idx3-ubyte.gz"
    return _call("qandc.data", f"load_fashion_mnist('train', {str(tmp / 'fmnist')!r})"), path, "more than"


def write(content: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(content)


def link(target: str) -> Callable[[Path], None]:
    return lambda path: path.symlink_to(target)


CASES = [
    Case("ckpt-random-bytes-keyerror", "readers", "a protocol-2 pickle whose memo lookup fails (KeyError in torch's "
         "unpickler)", _ckpt_bytes("800268e344b6edae5d27199be961ceb0704688ca3007ccd5a145a8e33eb87379a3b1284b65a25ee1e75"
                                   "ccd9e8781981f8d84e72e4e0f")),
    Case("ckpt-random-bytes-indexerror", "readers", "bytes whose first opcode pops an empty stack (IndexError)",
         _ckpt_bytes("73c988f12fe939dcff95f985f18d4b3f976ed210480acd086e118d518378ac889d")),
    Case("ckpt-random-bytes-struct-error", "readers", "a pickle cut inside an opcode's argument (struct.error)",
         _ckpt_bytes("80026a09c4")),
    Case("ckpt-zip-bomb", "readers", "a checkpoint zip under 1 MB whose storage inflates to 768 MB", _ckpt_zip_bomb),
    Case("ckpt-fifo", "readers", "the checkpoint is a FIFO nobody writes to", _ckpt_fifo),
    Case("ckpt-dev-zero", "readers", "the checkpoint is a link to /dev/zero (endless)", _ckpt_device),
    Case("sidecar-deeply-nested", "readers", "the sidecar JSON nests 100k lists",
         _sidecar(write(_deep_json()), "nested")),
    Case("sidecar-fifo", "readers", "the sidecar is a FIFO", _sidecar(_fifo, "not a regular file")),
    Case("sidecar-too-large", "readers", "a 40 MB sidecar (a JSON string)",
         _sidecar(write(b'{"model": {}, "notes": "' + b"x" * (40 << 20) + b'"}'), "more than")),
    Case("plan-deeply-nested", "readers", "PLAN.json nests 100k objects",
         _plan(write(b'{"a":' * 100_000 + b"1" + b"}" * 100_000), "nested")),
    Case("plan-moderately-nested", "readers", "PLAN.json nests 900 lists under a key (parses; deeper than any plan)",
         _plan(write(b'{"interval": 2, "x": ' + b"[" * 900 + b"]" * 900 + b"}"), "nested")),
    Case("plan-fifo", "readers", "PLAN.json is a FIFO", _plan(_fifo, "not a regular file")),
    Case("plan-dev-zero", "readers", "PLAN.json is a link to /dev/zero (endless)",
         _plan(link("/dev/zero"), "not a regular file")),
    Case("plan-dev-urandom", "readers", "PLAN.json is a link to /dev/urandom (endless)",
         _plan(link("/dev/urandom"), "not a regular file")),
    Case("diffusers-config-deeply-nested", "readers", "a diffusers config.json nesting 100k lists",
         _diffusers("config.json", write(_deep_json()), "nested")),
    Case("diffusers-weights-fifo", "readers", "the diffusers weights are a FIFO",
         _diffusers("w.safetensors", _fifo, "not a regular file|not a diffusers DiT")),
    Case("eval-npz-declares-huge-shape", "readers", "an npz whose header declares 1e12 float64 over 64 bytes",
         _eval_npz(lambda p: _npz_declaring(p, (10 ** 12,)), "declares")),
    Case("eval-npz-declares-huge-void", "readers", "an npz whose header declares one 4 GB void item",
         _eval_npz(lambda p: _npz_declaring(p, (), "|V4000000000"), "not a readable")),
    Case("eval-npz-zip-bomb", "readers", "an npz of 1 MB whose member inflates to 768 MB",
         _eval_npz(lambda p: _zip_bomb_npz(p, BOMB_BYTES), "decompression bomb")),
    Case("eval-png-decompression-bomb", "readers", "a PNG declaring 200000x200000 pixels",
         _eval_png(_png_declaring(200_000, 200_000), "pixels")),
    Case("eval-png-large", "readers", "a PNG declaring 9000x9000 pixels (under PIL's bomb limit)",
         _eval_png(_png_declaring(9000, 9000), "9000x9000 pixels, expected 28x28")),
    Case("eval-generated-config-deeply-nested", "readers", "a generate folder's config.json nesting 100k lists",
         _eval_generated_config(write(_deep_json()), "nested")),
    Case("eval-generated-config-fifo", "readers", "a generate folder's config.json is a FIFO",
         _eval_generated_config(_fifo, "not a regular file")),
    Case("pool-npz-declares-huge-shape", "readers", "pool.npz whose header declares 1e12 float64",
         _pool(lambda p: _npz_declaring(p, (10 ** 12,), name="x"), "declares")),
    Case("pool-npz-fifo", "readers", "pool.npz is a FIFO", _pool(_fifo, "not a regular file")),
    Case("selection-deeply-nested", "readers", "a selection JSON nesting 100k lists",
         _selection(write(b'{"indices": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "nested")),
    Case("selection-fifo", "readers", "a selection JSON is a FIFO", _selection(_fifo, "not a regular file")),
    Case("onnx-fifo", "readers", "an ONNX engine file is a FIFO", _onnx(_fifo, "not a regular file")),
    Case("onnx-random-bytes", "readers", "an ONNX engine file of random bytes",
         _onnx(write(np.random.default_rng(3).bytes(4096)), "not a readable ONNX model")),
    Case("onnx-empty", "readers", "an empty ONNX engine file (found by the fuzz tests: InvalidArgument escaped)",
         _onnx(write(b""), "not a readable ONNX model")),
    Case("torch-export-fifo", "readers", "a torch.export program is a FIFO", _exported(_fifo, "not a regular file")),
    Case("fmnist-gzip-bomb", "readers", "Fashion-MNIST train images: 3 MB of gzip inflating to 768 MB",
         _fmnist_bomb),
]


def _inputs(tmp: Path) -> dict[str, str | None]:
    """Every path under tmp and the sha256 of each regular file (FIFOs and links are not opened)."""
    out = {}
    for path in sorted(tmp.rglob("*")):
        regular = path.is_file() and not path.is_symlink()
        out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if regular else None
    return out


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@functools.cache
def memory_bound_kb() -> int:
    """Peak resident memory above which a case's reader is not bounded: what a child peaks at running `generate` on
    an empty checkpoint file (the imports and set-up every case pays), plus half of what a bomb unpacks to."""
    body = _generate(Path("empty.pt"), out=Path("out"))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "empty.pt").touch()
        run = subprocess.run([sys.executable, "-c", CHILD.format(body=body)], cwd=tmp, capture_output=True,
                             text=True, preexec_fn=_limit_memory, env={**os.environ, "PYTHONPATH": str(ROOT)})
    baseline = max(int(line.split()[1]) for line in run.stderr.splitlines() if line.startswith("MAXRSS "))
    return baseline + (BOMB_BYTES >> 11)


def run_case(case: Case, tmp: Path) -> tuple[str, str]:
    """(outcome, detail): outcome one of clear, traceback, hang, unbounded, data-lost, wrote, silent."""
    body, named, problem = case.setup(tmp)
    before = _inputs(tmp)
    try:
        run = subprocess.run([sys.executable, "-c", CHILD.format(body=body)], cwd=tmp, capture_output=True, text=True,
                             timeout=TIMEOUT_S, preexec_fn=_limit_memory, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return "hang", f"still running after {TIMEOUT_S} s"
    lines = [line for line in run.stderr.replace("\r", "\n").splitlines() if line.strip()]
    rss = [int(line.split()[1]) for line in lines if line.startswith("MAXRSS ")]
    lines = [line for line in lines if not line.startswith("MAXRSS ") and "Warning" not in line
             and not line.startswith("  ")]
    after = _inputs(tmp)
    if any(after.get(path) != digest for path, digest in before.items()):
        return "data-lost", "an input changed or vanished"
    if set(after) != set(before):
        return "wrote", f"wrote {sorted(set(after) - set(before))[:2]}"
    if rss and rss[0] > memory_bound_kb():
        return "unbounded", f"peak memory {rss[0] // 1024} MB; {lines[-1] if lines else ''}"[:300]
    if run.returncode == 0:
        return "silent", "exit 0"
    errors = [line for line in lines if re.match(r"qandc( [\w-]+)?: error: ", line)]
    if run.returncode != 2 or len(errors) != 1 or errors[0] != lines[-1]:
        return ("unbounded" if "MemoryError" in run.stderr else "traceback"), (lines[-1] if lines else
                                                                             f"exit {run.returncode}")[:300]
    if str(named) not in errors[0] or not re.search(problem, errors[0]):
        return "unclear", errors[0][:300]
    return "clear", errors[0][:300]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case's (outcome, detail), three child processes at a time."""
    def run(case):
        tmp = tmp_path_factory.mktemp(case.name)
        return case.name, run_case(case, tmp)
    with ThreadPoolExecutor(3) as pool:
        return dict(pool.map(run, CASES))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_reader_input(case, outcomes):
    outcome, detail = outcomes[case.name]
    assert outcome == "clear", f"{case.name} ({case.does}): {outcome}: {detail}"


def test_a_safetensors_file_this_user_may_not_read_is_named_so():
    """Not "No such file or directory", which safetensors itself says of it (as root, a child that has become
    `nobody` reads it: root reads every file; its folder is open to all, pytest's are not)."""
    import torch
    from safetensors.torch import save_file

    from qandc.artifacts import read_safetensors

    folder = Path(tempfile.mkdtemp())
    folder.chmod(0o755)
    path = folder / "amax.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    path.chmod(0)
    reader, writer = os.pipe()
    if (child := os.fork()) == 0:  # pragma: no cover - the child reports through the pipe and exits
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            read_safetensors(path)
            message = "read"
        except Exception as e:
            message = f"{type(e).__name__}: {e}"
        os.write(writer, message.encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    with os.fdopen(reader) as answer:
        said = answer.read()
    path.unlink()
    folder.rmdir()
    assert said == f"QandcError: {path}: not readable (Permission denied)"


if __name__ == "__main__":
    from collections import Counter

    counts = Counter()
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            outcome, detail = run_case(case, Path(tmp))
        counts[outcome] += 1
        print(f"{case.name:40s} {outcome:10s} {detail[:150]}", flush=True)
    print(f"cases {len(CASES)}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
