"""ttnn's mock-cluster mode, prepared by the project: no Tenstorrent card needed.

ttnn 0.81.1 opens N150 / N300 / T3K / Galaxy and Blackhole P150 / P300 / 4xP150 meshes
without hardware when `TT_METAL_MOCK_CLUSTER_DESC_PATH` names a UMD cluster descriptor
(shipped in `clusters/`).
Every op still JIT-compiles its kernels with the SFPI RISC-V toolchain, which ttnn would
download from GitHub. `prepare()` writes a stand-in for it instead: a folder that mirrors
the ttnn package (symlinks) plus `runtime/sfpi/compiler/bin/riscv-tt-elf-g++`, a shell
script that answers `--version`, writes empty objects and dependency files, and copies a
small valid RV32 ELF (linked once, at preparation, with Debian's
binutils-riscv64-unknown-elf) for kernel `.elf` outputs. With it, ops pass ttnn's own
argument, shape, memory-config and allocator checks and "run" (they compute nothing).

`configure(target)` decides between a real card and the mock and sets the environment;
it must run before a device is opened. This module never imports ttnn.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from compiler.targets import TARGETS

CLUSTERS_DIR = Path(__file__).resolve().parent / "clusters"
# target -> descriptor shipped with the project (public tt-cluster-descriptors / tt-umd data,
# sources in each file's header), from the target table
CLUSTER_FILES = {name: t.cluster_descriptor for name, t in TARGETS.items()}
SFPI_VERSION = "riscv-tt-elf-g++ (tenstorrent/sfpi:7.89.0[1050]) 15.1.0"
MOCK_ENV = "TTCOMPILE_TTNN_MOCK"  # auto (default) | 1 (always mock) | 0 (never mock)
MOCK_DIR_ENV = "TTCOMPILE_TTNN_MOCK_DIR"  # where the stand-in runtime is written
BINUTILS_PREFIX = "riscv64-unknown-elf-"
LAYOUT_VERSION = "1"  # bump when the stand-in changes, so old folders are rebuilt

_STUB_ASM = """\
    .section .text
    .globl _start
_start:
    lui a0, %hi(datum)
    addi a0, a0, %lo(datum)
    lw a1, 0(a0)
    ret
    .section .data
    .globl datum
datum:
    .word 0
"""
# Kernel ELFs as tt-metal loads them: text at 0, data in local memory (0xffb00000) with its
# load address at the end of text, relocations kept (--emit-relocs).
_STUB_LD = """\
ENTRY(_start)
SECTIONS {
  .text 0x0 : { *(.text*) }
  .data 0xffb00000 : AT(ADDR(.text) + SIZEOF(.text)) { *(.data*) }
}
"""
_COMPILER_SH = """\
#!/bin/sh
# Stand-in for the SFPI compiler (ttcompile's ttnn mock mode): no code is generated.
out=""; dep=""; prev=""
for a in "$@"; do
  case "$a" in --version) echo "{version}"; exit 0;; esac
  [ "$prev" = "-o" ] && out="$a"
  [ "$prev" = "-MF" ] && dep="$a"
  prev="$a"
done
[ -n "$dep" ] && printf '%s:\\n' "$out" > "$dep"
case "$out" in
  "") ;;
  *.elf) cp "$(dirname "$0")/../stub.elf" "$out" ;;
  *) : > "$out" ;;
esac
exit 0
"""


_PROCESS_CLUSTER: str | None = None  # the descriptor this process's ttnn cluster was built from


class MockSetupError(RuntimeError):
    pass


class TtnnNotInstalled(ValueError):
    """The ttnn backend was asked for in a Python without ttnn."""

    def __init__(self):
        super().__init__("the ttnn backend needs ttnn, which this Python does not have: run "
                         "scripts/setup_ttnn.sh and use .venv-ttnn/bin/python (ttnn 0.81.1, no torch)")


@dataclass(frozen=True)
class DeviceMode:
    """How the ttnn backend reaches a device: a real card, or the mock of `target`."""

    mock: bool
    target: str
    cluster_descriptor: str | None = None
    runtime_root: str | None = None

    def describe(self) -> str:
        if not self.mock:
            return f"real Tenstorrent hardware ({self.target})"
        name = Path(self.cluster_descriptor).name
        if name == CLUSTER_FILES.get(self.target.upper()):
            return f"mock {self.target} cluster ({name})"
        return f"mock cluster {name} (the {self.target} program on part of it)"


def card_present() -> bool:
    """A Tenstorrent PCIe device node exists (the kernel driver's /dev/tenstorrent/N)."""
    return bool(glob.glob("/dev/tenstorrent/*") or glob.glob("/dev/tenstorrent[0-9]*"))


def cluster_descriptor(target: str) -> Path:
    name = CLUSTER_FILES.get(target.upper())
    if name is None:
        raise ValueError(f"no mock cluster for target '{target}' (known: {', '.join(CLUSTER_FILES)})")
    path = CLUSTERS_DIR / name
    if not path.exists():
        raise MockSetupError(f"cluster descriptor {path} is missing from the installation")
    return path


def ttnn_package_dir() -> Path:
    """Where the ttnn package is installed, found without importing it."""
    spec = importlib.util.find_spec("ttnn")
    if spec is None or not spec.submodule_search_locations:
        raise TtnnNotInstalled()
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def default_mock_dir(ttnn_dir: Path) -> Path:
    if os.environ.get(MOCK_DIR_ENV):
        return Path(os.environ[MOCK_DIR_ENV])
    key = hashlib.sha256(f"{ttnn_dir}|{LAYOUT_VERSION}".encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "ttcompile" / "ttnn-mock" / key


def _build_stub_elf(folder: Path) -> Path:
    asm, ld = shutil.which(BINUTILS_PREFIX + "as"), shutil.which(BINUTILS_PREFIX + "ld")
    if not (asm and ld):
        raise MockSetupError(
            f"{BINUTILS_PREFIX}as/ld not found: the ttnn mock needs Debian's binutils-riscv64-unknown-elf "
            "(scripts/setup_ttnn.sh installs it; or: apt-get install binutils-riscv64-unknown-elf)")
    (folder / "stub.s").write_text(_STUB_ASM)
    (folder / "stub.ld").write_text(_STUB_LD)
    elf = folder / "stub.elf"
    for cmd in ([asm, "-march=rv32i", "-mabi=ilp32", "stub.s", "-o", "stub.o"],
                [ld, "-m", "elf32lriscv", "--emit-relocs", "-T", "stub.ld", "stub.o", "-o", "stub.elf"]):
        result = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
        if result.returncode != 0:
            raise MockSetupError(f"building the stand-in kernel ELF failed: {' '.join(cmd)}\n{result.stderr}")
    return elf


def _populate(root: Path, ttnn_dir: Path) -> None:
    """Mirror the ttnn package under `root`, with runtime/sfpi replaced by the stand-in."""
    for entry in ttnn_dir.iterdir():
        if entry.name != "runtime":
            (root / entry.name).symlink_to(entry)
    runtime = root / "runtime"
    runtime.mkdir()
    if (ttnn_dir / "runtime").is_dir():
        for entry in (ttnn_dir / "runtime").iterdir():
            if entry.name != "sfpi":
                (runtime / entry.name).symlink_to(entry)
    compiler = runtime / "sfpi" / "compiler"
    (compiler / "bin").mkdir(parents=True)
    _build_stub_elf(compiler)
    script = compiler / "bin" / "riscv-tt-elf-g++"
    script.write_text(_COMPILER_SH.replace("{version}", SFPI_VERSION))
    script.chmod(0o755)
    (root / ".ttcompile-mock").write_text(f"{LAYOUT_VERSION}\n{ttnn_dir}\n")


def prepare(mock_dir: Path | None = None) -> Path:
    """Create (once) the TT_METAL_RUNTIME_ROOT stand-in for this ttnn install; returns it."""
    ttnn_dir = ttnn_package_dir()
    root = Path(mock_dir) if mock_dir else default_mock_dir(ttnn_dir)
    marker = root / ".ttcompile-mock"
    if marker.exists() and marker.read_text() == f"{LAYOUT_VERSION}\n{ttnn_dir}\n":
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root.parent))
    try:
        _populate(staging, ttnn_dir)
        if root.exists():
            shutil.rmtree(root, ignore_errors=True)
        try:
            staging.rename(root)
        except OSError:  # another process won the race: use its folder if it is complete
            if not marker.exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return root


def _chips(descriptor: Path) -> int:
    """Chips in a cluster descriptor (its `arch:` map has one line per chip)."""
    lines = descriptor.read_text().splitlines()
    count = 0
    for line in lines[lines.index("arch:") + 1:]:
        if not line.startswith(" "):
            break
        count += 1
    return count


def _arch(descriptor: Path) -> str:
    """The chips' architecture in a cluster descriptor (its `arch:` map), e.g. wormhole_b0."""
    lines = descriptor.read_text().splitlines()
    archs = set()
    for line in lines[lines.index("arch:") + 1:]:
        if not line.startswith(" "):
            break
        archs.add(line.split(":", 1)[1].strip())
    return "/".join(sorted(archs))


def wants_mock() -> bool:
    choice = os.environ.get(MOCK_ENV, "auto").strip().lower()
    if choice in ("1", "true", "yes", "on"):
        return True
    if choice in ("0", "false", "no", "off"):
        return False
    return not card_present()


def configure(target: str, quiet: bool = False) -> DeviceMode:
    """Choose real hardware or the mock cluster of `target`, and set ttnn's environment.

    Call before the first device is opened (ttnn reads these variables then, not at
    import). A descriptor the user already set in
    TT_METAL_MOCK_CLUSTER_DESC_PATH is respected.
    """
    global _PROCESS_CLUSTER
    if not wants_mock():
        return DeviceMode(mock=False, target=target)
    wanted = str(cluster_descriptor(target))
    current = os.environ.get("TT_METAL_MOCK_CLUSTER_DESC_PATH")
    if current and current == _PROCESS_CLUSTER and current != wanted:
        # ttnn builds its cluster once per process: a smaller target runs on part of it
        # (as a smaller target may run on a larger system); a larger one cannot.
        have_arch, need_arch = _arch(Path(current)), _arch(Path(wanted))
        if have_arch != need_arch:  # e.g. a Blackhole program after a Wormhole one
            raise MockSetupError(
                f"this process already uses the mock cluster {Path(current).name} ({have_arch}) and ttnn "
                f"cannot switch clusters within a process; replay the {target} program ({need_arch}) "
                "in a new process")
        have, need = _chips(Path(current)), _chips(Path(wanted))
        if have < need:
            raise MockSetupError(
                f"this process already uses the mock cluster {Path(current).name} ({have} chips) and ttnn "
                f"cannot switch clusters within a process; replay the {target} program ({need} chips) "
                "in a new process")
        descriptor = current
    else:
        descriptor = current or wanted
    root = prepare()
    os.environ["TT_METAL_MOCK_CLUSTER_DESC_PATH"] = descriptor
    if descriptor != current:
        _PROCESS_CLUSTER = descriptor
    os.environ["TT_METAL_RUNTIME_ROOT"] = str(root)
    # Kernel binaries built by the stand-in are empty: they must never land in a JIT cache a
    # real device would load from, so the mock always has its own.
    os.environ["TT_METAL_CACHE"] = str(root.parent / "jit-cache") + os.sep
    os.environ.setdefault("TT_LOGGER_LEVEL", "error")
    os.environ.setdefault("LOGURU_LEVEL", "WARNING")
    mode = DeviceMode(mock=True, target=target, cluster_descriptor=descriptor, runtime_root=str(root))
    if not quiet:
        print(f"ttnn backend: no Tenstorrent card found; using the {mode.describe()} "
              "(ttnn validates every op; results are not computed)", file=sys.stderr)
    return mode
