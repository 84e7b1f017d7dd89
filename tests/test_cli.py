"""The ``tfa-widgets`` command line, the committed Voila app notebook, and the Binder files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest
from browser_support import free_port
from nbformat.sign import NotebookNotary

from tfa_widgets import cli, serving

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"
BINDER_URL = re.compile(
    r"https://mybinder\.org/v2/gh/[\w.-]+/[\w.-]+/HEAD\?urlpath=voila/render/(\S+?\.ipynb)"
)


def test_committed_app_notebook_is_the_generated_one_without_outputs():
    committed = nbformat.read(ROOT / "notebooks" / "explorer.ipynb", as_version=4)
    generated = cli.explorer_notebook()
    assert [(c.cell_type, c.source) for c in committed.cells] == [
        (c.cell_type, c.source) for c in generated.cells
    ]
    assert all(not c.get("outputs") for c in committed.cells if c.cell_type == "code")
    assert cli.find_explorer_notebook() == ROOT / "notebooks" / "explorer.ipynb"


def test_voila_command_listens_where_asked():
    command = cli.voila_command(Path("app.ipynb"), "127.0.0.1", 9123)
    assert Path(command[0]).name == "voila"
    assert command[1:5] == ["app.ipynb", "--no-browser", "--port=9123", "--Voila.ip=127.0.0.1"]


def test_voila_command_culls_idle_kernels_and_fixes_the_page_close_shutdown():
    default = cli.voila_command(Path("app.ipynb"), "127.0.0.1", 9123)
    assert f"--MappingKernelManager.cull_idle_timeout={serving.KERNEL_IDLE_TIMEOUT_S}" in default
    provider = "tfa_widgets.serving.XsrfCookieIdentityProvider"
    assert f"--Voila.identity_provider_class={provider}" in default
    assert not any("preheat" in option for option in default)

    argv = ["serve", "app.ipynb", "--idle-timeout", "30", "--pool-size", "2"]
    args = cli._parser().parse_args(argv)
    command = cli.voila_command(args.notebook, "127.0.0.1", 1, args.idle_timeout, args.pool_size)
    assert "--MappingKernelManager.cull_idle_timeout=30" in command
    assert "--MappingKernelManager.cull_interval=3" in command
    assert "--preheat_kernel=True" in command and "--pool_size=2" in command


def test_pool_refills_wait_and_the_app_leaves_out_the_extensions_it_does_not_use():
    pooled = cli.voila_command(Path("app.ipynb"), "127.0.0.1", 1, 600, 2, app=True)
    assert f"--VoilaKernelManager.fill_delay={serving.REFILL_DELAY_S}" in pooled
    option = "--VoilaConfiguration.extension_denylist="
    denied = [o.removeprefix(option) for o in pooled if o.startswith(option)]
    assert denied == list(serving.APP_EXTENSION_DENYLIST)
    other = cli.voila_command(Path("app.ipynb"), "127.0.0.1", 1, 600, 0)
    assert not any("fill_delay" in o or "extension_denylist" in o for o in other)


def test_kernels_are_told_a_plotly_js_url_that_voila_serves():
    command = cli.voila_command(Path("app.ipynb"), "127.0.0.1", 1)
    served = [
        Path(o.split("=", 1)[1])
        for o in command
        if o.startswith("--VoilaConfiguration.extra_labextensions_path=")
    ]
    url = serving.kernel_environment()[serving.PLOTLY_URL_ENV]
    prefix = "voila/labextensions/"  # Voila serves the labextension paths there
    assert url.startswith(prefix)
    assert [(d / url.removeprefix(prefix)).is_file() for d in served] == [True]
    # Served there, but no JupyterLab extension: Voila takes a folder with a package.json for one.
    assert not list(served[0].glob("*/package.json"))


def test_cull_interval_keeps_the_overshoot_within_a_tenth_of_the_timeout():
    for timeout in (1, 5, 10, 30, 600, 3600):
        interval = serving.cull_interval_s(timeout)
        assert 1 <= interval <= serving.MAX_CULL_INTERVAL_S
        assert interval <= max(1, timeout / 10)


@pytest.mark.parametrize("option", ["--idle-timeout", "--pool-size"])
def test_negative_serving_options_are_refused(option, capsys):
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["serve", "app.ipynb", option, "-1"])
    assert "must be 0 or more" in capsys.readouterr().err


def test_trust_notebook_signs_it_in_the_users_store(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter-data"))
    path = tmp_path / "app.ipynb"
    nbformat.write(cli.explorer_notebook(), path)
    notary = NotebookNotary()
    assert not notary.check_signature(nbformat.read(path, as_version=4))
    serving.trust_notebook(path)
    assert NotebookNotary().check_signature(nbformat.read(path, as_version=4))


def test_importing_the_cli_and_serving_modules_does_not_import_torch():
    # The Voila server process imports tfa_widgets.serving for its identity provider: it must
    # not pay for torch (about 0.7 GB resident) in the server as well as in each kernel.
    code = "import sys, tfa_widgets.cli, tfa_widgets.serving; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_serve_rejects_a_missing_notebook(tmp_path, capsys):
    assert cli.main(["serve", str(tmp_path / "missing.ipynb")]) == 2
    assert "no notebook" in capsys.readouterr().err


def test_demo_no_serve_builds_and_prints_the_command(demo_engine, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path))  # the notebook is trusted here
    demo_engine.build_index()  # trained and indexed once per test session
    assert cli.main(["demo", "--no-serve", "--port", "9321"]) == 0
    out = capsys.readouterr().out
    assert "Demo ready" in out and "--port=9321" in out and "explorer.ipynb" in out
    notebook = nbformat.read(ROOT / "notebooks" / "explorer.ipynb", as_version=4)
    assert NotebookNotary().check_signature(notebook)


@pytest.mark.slow
def test_serve_starts_voila_and_prints_its_url(tmp_path):
    notebook = tmp_path / "hello.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("print('hello from voila')")]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, notebook)
    port = free_port()
    script = Path(sys.executable).with_name("tfa-widgets")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "tfa_widgets.cli"]
    proc = subprocess.Popen(
        [*command, "serve", str(notebook), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        assert proc.stdout.readline().strip().startswith(f"Explorer at {url}")
        deadline, page = time.monotonic() + 90, ""
        while time.monotonic() < deadline and not page:
            assert proc.poll() is None, "voila exited"
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    page = response.read().decode()
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        assert "hello from voila" in page
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement)[0].lower().replace("_", "-")


def test_binder_requirements_install_this_repo_and_pin_only_a_cpu_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = _requirement_lines(BINDER / "requirements.txt")
    assert "-e ." in lines, "the dependency list must come from pyproject.toml"
    pins = [ln for ln in lines if not ln.startswith(("-", "."))]
    assert {_name(p) for p in pins} == {"torch", "torchvision"}  # no copy of pyproject's list
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines
    wanted = {_name(d): d for d in project["dependencies"]}
    for pin in pins:  # exact CPU builds, inside the ranges pyproject.toml allows
        name, version = pin.split("==")
        assert version.endswith("+cpu"), pin
        minimum = wanted[name].split(">=")[1]
        release = tuple(map(int, version.removesuffix("+cpu").split(".")))
        assert release >= tuple(map(int, minimum.split("."))), (pin, wanted[name])
    assert project["scripts"]["tfa-widgets"] == "tfa_widgets.cli:main"

    version = (BINDER / "runtime.txt").read_text().strip().removeprefix("python-")
    minimum = project["requires-python"].removeprefix(">=")
    assert tuple(map(int, version.split("."))) >= tuple(map(int, minimum.split(".")))


def test_binder_culls_idle_kernels_like_the_cli_and_prebuilds_the_demo():
    config = json.loads((BINDER / "jupyter_server_config.json").read_text())
    culling = config["MappingKernelManager"]
    assert culling["cull_idle_timeout"] == serving.KERNEL_IDLE_TIMEOUT_S
    assert culling["cull_interval"] == serving.cull_interval_s(serving.KERNEL_IDLE_TIMEOUT_S)

    post = BINDER / "postBuild"
    assert os.access(post, os.X_OK), "postBuild must be executable"
    lines = [ln.strip() for ln in post.read_text().splitlines() if ln.strip() and ln[0] != "#"]
    assert any("binder/jupyter_server_config.json" in ln and "$config_dir" in ln for ln in lines), (
        "postBuild must install the culling config into the Jupyter config directory"
    )
    assert 'config_dir="$(jupyter --config-dir)"' in lines
    demo_lines = [ln for ln in lines if ln.startswith("tfa-widgets ")]
    assert demo_lines, "postBuild must prebuild the demo"
    for line in demo_lines:  # each command exists in the CLI with these arguments
        args = cli._parser().parse_args(line.split()[1:])
        assert args.command == "demo" and args.no_serve


def test_readme_links_binder_to_the_voila_app():
    readme_path = ROOT / "README.md"
    assert readme_path.is_file(), "README.md is missing"
    readme = readme_path.read_text()
    match = BINDER_URL.search(readme)
    assert match, "README needs the Binder link that opens the explorer in Voila"
    assert (ROOT / match.group(1)).is_file()


def test_clean_cache_deletes_the_cache_the_package_uses(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    (cache / "demo").mkdir(parents=True)
    (cache / "demo" / "model.safetensors").write_bytes(b"x" * 2048)
    monkeypatch.setenv("TFA_CACHE_DIR", str(cache))
    monkeypatch.chdir(tmp_path)
    from tfa_widgets.data import cache_dir

    assert cache_dir() == cache  # the directory the package itself writes to
    assert cli.main(["clean-cache"]) == 0
    assert not cache.exists() and "Deleted" in capsys.readouterr().out
    assert cli.main(["clean-cache"]) == 0
    assert "No cache" in capsys.readouterr().out


def test_clean_cache_refuses_a_directory_holding_home_or_the_working_directory(
    tmp_path, monkeypatch, capsys
):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("TFA_CACHE_DIR", str(tmp_path))
    assert cli.main(["clean-cache"]) == 2
    assert "refusing" in capsys.readouterr().err and (tmp_path / "work").is_dir()


def _make_recipe(target: str) -> str:
    return (ROOT / "Makefile").read_text().split(f"\n{target}:", 1)[1].split("\n\n")[0]


def test_make_clean_cache_runs_the_cli():
    assert "tfa-widgets clean-cache" in _make_recipe("clean-cache")


def test_make_demo_serves_with_the_cli_and_a_preheated_kernel():
    recipe = _make_recipe("demo").split("\n", 1)[1].split()
    argv = recipe[recipe.index("$(BIN)/tfa-widgets") + 1 :]
    assert argv[:1] == ["demo"] and "--pool-size" in argv
    assert re.search(r"^POOL_SIZE \?= [1-9]", (ROOT / "Makefile").read_text(), re.M)
