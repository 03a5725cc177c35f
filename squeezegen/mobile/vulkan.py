"""A Vulkan driver for LiteRT's GPU accelerator: the machine's own where it has a GPU, else the
project's software one (Mesa >= 25 lavapipe, unpacked into the checkout by tools/software_vulkan.sh).

LiteRT's WebGPU accelerator (Dawn over Vulkan) loads libvulkan.so.1 inside this process, so the driver
is chosen before the first GPU model compiles: `activate` sets the loader's variables and loads the
folder's libraries by absolute path, because LD_LIBRARY_PATH is read only when a process starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from squeezegen.errors import SqueezegenError

SYSTEM_ICD_DIRS = ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d")
SOFTWARE_ICDS = ("lvp", "swiftshader")  # CPU-only drivers among a system's manifests
SETUP_HINT = "run `make gpu-sw` (tools/software_vulkan.sh) or install a Vulkan driver (Mesa >= 25 lavapipe)"


@dataclass(frozen=True)
class VulkanDriver:
    """Where LiteRT's GPU accelerator finds Vulkan: `icd` for VK_ICD_FILENAMES ("" lets the loader search
    the system), `libdir` holding libvulkan.so.1 and the driver's libraries when they are not the system's."""

    kind: str  # "VK_ICD_FILENAMES", "system GPU", "system software" or "project software"
    icd: str
    libdir: Path | None = None


def software_dir() -> Path:
    """The project's software driver folder: $SQUEEZEGEN_VULKAN_DIR, else .gpu-sw in the checkout."""
    if os.environ.get("SQUEEZEGEN_VULKAN_DIR"):
        return Path(os.environ["SQUEEZEGEN_VULKAN_DIR"])
    return Path(__file__).resolve().parents[2] / ".gpu-sw"


def _has_gpu_device() -> bool:
    return bool(glob.glob("/dev/dri/renderD*") or os.path.exists("/dev/nvidia0"))


def _system_icds() -> list[Path]:
    return sorted(Path(p) for d in SYSTEM_ICD_DIRS for p in glob.glob(f"{d}/*.json"))


def _api_version(icd: Path) -> tuple[int, ...]:
    try:
        version = json.loads(icd.read_text())["ICD"]["api_version"]
        return tuple(int(x) for x in version.split("."))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ()


def find_driver() -> VulkanDriver | None:
    """The driver to use, in this order: the user's VK_ICD_FILENAMES; the system's driver when the
    machine has a GPU device; a system lavapipe new enough for Dawn (Vulkan 1.4, Mesa >= 25; Mesa 22's
    is refused with "No adapters found"); the project's software driver. None when there is none."""
    user = os.environ.get("VK_ICD_FILENAMES") or os.environ.get("VK_DRIVER_FILES")
    if user:
        return VulkanDriver("VK_ICD_FILENAMES", user)
    system_loader = ctypes.util.find_library("vulkan") is not None
    icds = _system_icds()
    if system_loader and _has_gpu_device() and any(not _is_software(p) for p in icds):
        return VulkanDriver("system GPU", "")
    if system_loader:
        for icd in icds:
            if "lvp" in icd.name and _api_version(icd) >= (1, 4):
                return VulkanDriver("system software", str(icd))
    folder = software_dir()
    if (folder / "icd.json").is_file():
        return VulkanDriver("project software", str(folder / "icd.json"), folder / "root/usr/lib/x86_64-linux-gnu")
    return None


def _is_software(icd: Path) -> bool:
    return any(name in icd.name for name in SOFTWARE_ICDS)


def activate(driver: VulkanDriver | None = None) -> VulkanDriver:
    """Point this process's Vulkan loader at `driver` (default: `find_driver()`) before LiteRT's GPU
    accelerator first opens (later calls change nothing that matters). Raises a SqueezegenError naming
    the fix when there is no driver."""
    driver = driver or find_driver()
    if driver is None:
        raise SqueezegenError(f"no Vulkan driver for LiteRT's GPU accelerator: {SETUP_HINT}")
    if driver.icd:
        os.environ["VK_ICD_FILENAMES"] = driver.icd
    if not os.environ.get("XDG_RUNTIME_DIR") or not os.path.isdir(os.environ["XDG_RUNTIME_DIR"]):
        os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="squeezegen-xdg-")  # 0700, as Dawn wants
    if driver.libdir is not None:
        # libvulkan first, then the newer libdrm Mesa 25 needs: loaded by path, they satisfy the sonames
        # the driver asks for, whatever older copies the system has
        for name in ("libdrm.so.2", "libdrm_amdgpu.so.1", "libvulkan.so.1"):
            lib = driver.libdir / name
            if not lib.is_file():
                raise SqueezegenError(f"{lib} is missing: delete {software_dir()} and run `make gpu-sw` again")
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    return driver
