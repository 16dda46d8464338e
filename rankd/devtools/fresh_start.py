"""What a new user does, checked on an empty cache: ``python3 -m rankd.devtools.fresh_start``.

Two paths, each in a fresh clone of this repository with a fresh venv and an empty
``XDG_CACHE_HOME`` (so nothing converted or exported earlier is reused; pip keeps its own cache,
``PIP_CACHE_DIR``, so that the install stays fast):

- ``readme``: the README's first Quick-start command, read from the README as written, run in a
  shell;
- ``image``: the API image's dependency set. The build stage's ``pip install`` lines, read from
  docker/Dockerfile, are replayed into a fresh venv; then the index step (docker/index-init.sh)
  and the runtime stage's ``CMD`` run with the runtime stage's ``ENV``.

Each waits for "serving on", then checks that ``/rank`` answers ``reranked: true``, that
``/v1/rerank`` and ``/answer`` answer 200, and that ``/docs`` renders with its assets offline;
then it stops the server and removes the clone. It prints one JSON line of timings per path and
exits non-zero on the first failure, with the server's log.

Standard library only: it runs with the machine's own Python, before any venv exists.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rankd.devtools.dockerfile import dockerfile_stages, exec_form, stage_env
from rankd.devtools.ports import free_port
from rankd.devtools.processes import stop_process

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCKERFILE = REPO / "docker" / "Dockerfile"
INDEX_INIT = Path("docker") / "index-init.sh"
SERVING = re.compile(r"serving on (http://\S+)")
# PyTorch's own index is beyond this workplace's network; the find-links of this machine's pip
# hold the same CPU wheel (torch==2.13.0+cpu), so the replay leaves the index out.
UNREACHABLE_INDEX = re.compile(r"--index-url\s+https://download\.pytorch\.org/\S+\s*")
# Variables that would point the run at the caller's venv or caches.
INHERITED_AWAY = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "HF_HOME", "RANKD_VLLM_PYTHON",
                  "RANKD_QUANT_PYTHON", "TRANSFORMERS_CACHE", "SENTENCE_TRANSFORMERS_HOME")
QUERY = "Calculate 1/2 + 1/3. Incorrect answer: 2/5"


class FreshStartError(RuntimeError):
    pass


def quick_start_command(readme: Path = README) -> str:
    """The first command of the README's Quick start: the first line of its first bash block
    that is not a comment."""
    text = readme.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)
    if len(section) < 2:
        raise FreshStartError(f"{readme} has no '## Quick start' section")
    block = re.search(r"```bash\n(.*?)```", section[1], re.S)
    if not block:
        raise FreshStartError(f"{readme}: the Quick start has no ```bash block")
    for line in block.group(1).splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.strip()
    raise FreshStartError(f"{readme}: the Quick start's bash block holds no command")


def image_install_lines(dockerfile: Path = DOCKERFILE) -> list[str]:
    """The build stage's RUN lines that install Python packages, as the shell runs them, with
    PyTorch's unreachable index left out (the same wheel comes from pip's find-links here)."""
    build = dockerfile_stages(dockerfile)[0]
    lines = [UNREACHABLE_INDEX.sub("", run) for run in build.all("RUN") if "pip install" in run]
    if not lines:
        raise FreshStartError(f"{dockerfile}: the build stage has no `pip install` line")
    return lines


def image_runtime(dockerfile: Path = DOCKERFILE) -> tuple[list[str], dict[str, str]]:
    runtime = dockerfile_stages(dockerfile)[-1]
    return exec_form(runtime.last("CMD")), stage_env(runtime)


def pip_cache_dir() -> str:
    """pip's cache as the caller has it, kept when XDG_CACHE_HOME moves."""
    if os.environ.get("PIP_CACHE_DIR"):
        return os.environ["PIP_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "pip")


def fresh_env(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in INHERITED_AWAY and not k.startswith("RANKD_")}
    cache = root / "cache"
    cache.mkdir()
    env.update(XDG_CACHE_HOME=str(cache), PIP_CACHE_DIR=pip_cache_dir(),
               PATH=os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                    if ".venv" not in p))
    env.update(extra)
    return env


@contextlib.contextmanager
def fresh_clone() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="rankd-fresh-"))
    try:
        subprocess.run(["git", "clone", "-q", str(REPO), str(root / "clone")], check=True)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _request(method: str, url: str, body: Any = None, timeout: float = 120.0,
             ) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data else {}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def check_service(url: str) -> dict[str, Any]:
    """The promises of the Quick start, against a running service; raises on the first broken
    one. Returns the first /rank's time and top result."""
    started = time.perf_counter()
    status, body = _request("POST", f"{url}/rank", {"query": QUERY, "top_k": 3})
    first_rank_s = time.perf_counter() - started
    if status != 200:
        raise FreshStartError(f"/rank answered {status}: {body[:500]!r}")
    rank = json.loads(body)
    if rank.get("reranked") is not True:
        raise FreshStartError(f"/rank did not rerank: {rank.get('warnings')}")
    status, body = _request("POST", f"{url}/v1/rerank", {
        "query": "Work out -4 x -3. Incorrect answer: -12",
        "documents": ["Believes the product of two negative numbers is negative",
                      "Confuses radius and diameter"], "top_n": 1})
    if status != 200:
        raise FreshStartError(f"/v1/rerank answered {status}: {body[:500]!r}")
    status, body = _request("POST", f"{url}/answer", {
        "question": "What is 7 to the power 0?", "options": ["0", "1", "7", "49"],
        "passages": 3})
    if status != 200:
        raise FreshStartError(f"/answer answered {status}: {body[:500]!r}")
    status, page = _request("GET", f"{url}/docs")
    if status != 200 or b"swagger-ui" not in page.lower():
        raise FreshStartError(f"/docs answered {status} without Swagger UI")
    # The page's own scripts and styles, which must come from this service (no CDN offline).
    assets = re.findall(rb'(?:src|href)="([^"]+\.(?:js|css))"', page)
    if not assets:
        raise FreshStartError("/docs names no script or stylesheet")
    for asset in assets:
        link = asset.decode()
        if link.startswith("http") and not link.startswith(url):
            raise FreshStartError(f"/docs loads {link} from outside the service")
        status, _ = _request("GET", link if link.startswith("http") else f"{url}{link}")
        if status != 200:
            raise FreshStartError(f"/docs asset {link} answered {status}")
    top = rank["results"][0]
    return {"first_rank_s": round(first_rank_s, 2),
            "rank_top": {"id": top["id"], "rerank_score": top.get("rerank_score")}}


def run_until_serving(command: list[str], cwd: Path, env: dict[str, str], log: Path,
                      timeout_s: float) -> dict[str, Any]:
    """Start ``command``, wait for "serving on", check the service, stop it. Raises with the
    log's tail when anything fails."""
    started = time.perf_counter()
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = None
        while url is None:
            if process.poll() is not None:
                raise FreshStartError(f"exited with {process.returncode} before serving")
            if time.perf_counter() - started > timeout_s:
                raise FreshStartError(f"not serving after {timeout_s:.0f} s")
            found = SERVING.search(log.read_text(encoding="utf-8", errors="replace"))
            url = found.group(1) if found else None
            time.sleep(1)
        serving_s = time.perf_counter() - started
        figures = check_service(url)
        return {"serving_s": round(serving_s, 1), **figures}
    except FreshStartError as exc:
        tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise FreshStartError(f"{shlex.join(command)}: {exc}\n--- its output, last lines:\n"
                              f"{tail}") from None
    finally:
        stop_process(process, grace_s=40)


def check_readme(timeout_s: float) -> dict[str, Any]:
    command = quick_start_command()
    with fresh_clone() as root:
        clone = root / "clone"
        env = fresh_env(root, RANKD_PORT=str(free_port()))
        figures = run_until_serving(["bash", "-c", command], clone, env, root / "readme.log",
                                    timeout_s)
        converted = list((root / "cache" / "rankd" / "models").glob("*"))
        if not converted:
            raise FreshStartError("no model was converted under the empty XDG_CACHE_HOME: the "
                                  "run read another cache")
    return {"path": "readme", "command": command, **figures}


def check_image(timeout_s: float) -> dict[str, Any]:
    lines = image_install_lines()
    command, image_env = image_runtime()
    with fresh_clone() as root:
        clone = root / "clone"
        venv = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        env = fresh_env(root, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
                        VIRTUAL_ENV=str(venv))
        install_started = time.perf_counter()
        for line in lines:
            done = subprocess.run(["sh", "-c", line], cwd=clone, env=env,
                                  capture_output=True, text=True, check=False)
            if done.returncode:
                raise FreshStartError(f"the image's install line failed ({done.returncode}): "
                                      f"{line}\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
        install_s = time.perf_counter() - install_started
        home = root / "home"
        home.mkdir()
        runtime = {k: v for k, v in image_env.items() if k != "PATH"}
        runtime.update(RANKD_HOST="127.0.0.1", RANKD_PORT=str(free_port()),
                       RANKD_INDEX_DIR=str(root / "index"), HF_HOME=str(home / "hf"),
                       HOME=str(home))
        env.update(runtime)
        index = subprocess.run([str(clone / INDEX_INIT)], cwd=home, env=env,
                               capture_output=True, text=True, check=False)
        if index.returncode:
            raise FreshStartError(f"{INDEX_INIT} failed: {index.stdout}{index.stderr[-3000:]}")
        figures = run_until_serving(command, home, env, root / "image.log", timeout_s)
    return {"path": "image", "install_lines": len(lines), "install_s": round(install_s, 1),
            **figures}


CHECKS = {"readme": check_readme, "image": check_image}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", metavar="|".join(CHECKS),
                        help="which paths to check (default: all)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds until 'serving on', install included")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.paths) - set(CHECKS))
    if unknown:
        parser.error(f"unknown path {unknown[0]!r}; choose from {', '.join(CHECKS)}")
    for name in args.paths or list(CHECKS):
        started = time.perf_counter()
        try:
            figures = CHECKS[name](args.timeout)
        except (FreshStartError, subprocess.CalledProcessError) as exc:
            print(f"fresh start ({name}): FAILED: {exc}", file=sys.stderr)
            return 1
        figures["total_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
