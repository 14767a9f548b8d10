"""Type-check code against TensorRT's API stubs (`tensorrt-stubs`) without TensorRT.

`make setup` installs the stubs with `pip install --no-deps --target .venv/tensorrt-stubs` rather than into
site-packages: there their `tensorrt/` folder (only `.pyi` files) would import as an empty namespace package, so
`import tensorrt` would succeed without TensorRT. Some generated signatures do not parse; `patched_stubs` copies the
stubs and fixes exactly the lines Python's parser rejects:
- a parameter named after a keyword (`in: list[PluginTensorDesc]`) is renamed (`in_`);
- a parameter without a default after one with a default (`add_scale_nd(..., power: Weights = None,
  channel_axis: int)`) becomes keyword-only (`*,` inserted before it).
Any other unparseable line raises, naming it. Two conversions TensorRT's bindings make at runtime are added, as
idiomatic TensorRT code relies on them: `Dims` iterate by index (`tuple(tensor.shape)`), so `Dims` gets `__iter__`;
tuples and lists convert to `Dims` (`profile.set_shape(name, (1, 4), ...)`), so a `Dims` parameter also takes
`Sequence[int]`. Run it as a script to check the TensorRT backend by hand.
"""

from __future__ import annotations

import ast
import io
import keyword
import os
import re
import shutil
import subprocess
import sys
import tokenize
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKEND = ROOT / "qandc" / "engines" / "tensorrt_backend.py"
STUBS = Path(sys.prefix) / "tensorrt-stubs"
_KEYWORD_PARAM = re.compile(rf"([(,]\s*)({'|'.join(keyword.kwlist)})(\s*:)")
_DIMS_PARAM = re.compile(r"(?<=: )Dims(?=\s*[,)=])")


def stubs_version() -> str | None:
    """The installed tensorrt-stubs version, or None when they are not installed."""
    return next((d.version for d in metadata.distributions(path=[str(STUBS)])), None)


def _keyword_only_after_default(line: str) -> str:
    """In a one-line `def`, insert `*,` before the first parameter without a default that follows one with a default."""
    if not line.lstrip().startswith("def "):
        return line
    starts: list[int] = []  # per parameter: the column after the `(` or `,` before it
    defaults: list[bool] = []  # per parameter: whether it has a default
    depth = 0
    for tok in tokenize.generate_tokens(io.StringIO(line).readline):
        if tok.type != tokenize.OP:
            continue
        if tok.string in "([{":
            depth += 1
            if depth == 1 and not starts:
                starts, defaults = [tok.end[1]], [False]
        elif tok.string in ")]}":
            depth -= 1
            if depth == 0:
                break
        elif depth == 1 and tok.string == ",":
            starts.append(tok.end[1])
            defaults.append(False)
        elif depth == 1 and tok.string == "=":
            defaults[-1] = True
    for i, (start, has_default) in enumerate(zip(starts, defaults)):
        if not has_default and any(defaults[:i]):
            start += len(line[start:]) - len(line[start:].lstrip())
            return f"{line[:start]}*, {line[start:]}"
    return line


def patch_stub(text: str, name: str) -> str:
    """Fix each line of a .pyi file that Python cannot parse (or raise naming it), then add the Dims conversions."""
    lines = text.splitlines(keepends=True)
    while True:
        try:
            ast.parse("".join(lines), filename=name)
            break
        except SyntaxError as e:
            i = (e.lineno or 0) - 1
            fixed = _keyword_only_after_default(_KEYWORD_PARAM.sub(r"\1\2_\3", lines[i]))
            if fixed == lines[i]:
                raise ValueError(f"{name}:{e.lineno}: cannot patch it ({e.msg}): {lines[i].strip()}") from e
            lines[i] = fixed
    return "".join(map(_dims_conversions, lines))


def _dims_conversions(line: str) -> str:
    """`Sequence[int]` accepted wherever a `Dims` parameter is; `__iter__` added after `class Dims:`."""
    if line.lstrip().startswith("def "):
        return _DIMS_PARAM.sub("Dims | typing.Sequence[int]", line)
    if line.rstrip() == "class Dims:":
        return f"{line}    def __iter__(self) -> typing.Iterator[int]: ...{line[len(line.rstrip()):]}"
    return line


def patched_stubs(dest: Path) -> Path:
    """Copy the installed stubs to DEST and patch them (see the module's docstring); returns DEST (for MYPYPATH)."""
    for package in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(STUBS / package, dest / package)
    for path in dest.rglob("*.pyi"):
        path.write_bytes(patch_stub(path.read_bytes().decode(), str(path.relative_to(dest))).encode())  # keeps CRLF
    return dest


def run_mypy(stubs: Path, *args: str) -> subprocess.CompletedProcess:
    """mypy with the project's [tool.mypy] settings and the patched STUBS on its path, run from the repository root."""
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *args],
                          cwd=ROOT, env={**os.environ, "MYPYPATH": str(stubs)}, capture_output=True, text=True)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = run_mypy(patched_stubs(Path(tmp) / "stubs"), "--cache-dir", str(Path(tmp) / "cache"), str(BACKEND))
    print(result.stdout + result.stderr, end="")
    sys.exit(result.returncode)
