"""How Voila serves the explorer without leaking kernels, and without noise in the terminal.

Each open Voila page owns a kernel (about 1 GB with the demo loaded). Two things end it:

- **Page close.** Voila's page sends ``POST voila/api/shutdown/<kernel>`` on ``beforeunload`` with
  the ``_xsrf`` cookie as form field, but stand-alone Voila never sets that cookie (it renders the
  page without touching ``xsrf_token``), so the request is refused with ``403 '_xsrf' argument
  missing from POST`` (voila-dashboards/voila#1458). :class:`XsrfCookieIdentityProvider` sets the
  cookie on the first GET, and the shutdown goes through.
- **Idle culling.** Anything that never says goodbye (a killed browser, a plain ``GET /`` from a
  health check, a network drop) leaves a kernel with no connection. Jupyter's kernel culler shuts
  down kernels that have been idle with no open connection for :data:`KERNEL_IDLE_TIMEOUT_S`
  seconds; a connected page is never culled, however long it is left alone.

Kernels talk to Voila over IPC sockets on POSIX, so ipykernel does not warn about unencrypted TCP.

What a first page costs (measured with the explorer, one user, preheated pool of 1, two cores):

- **Pool refill.** Voila starts a new pool kernel one second after a page takes one, and a new
  kernel imports torch and runs the notebook while the page renders. Refills
  wait :data:`REFILL_DELAY_S` instead, so the first pages render first.
- **plotly.js.** The explorer's figures need plotly.js (4.8 MB). Sent inside the widget state it
  crossed the websocket, then was compiled and run on the page's main thread; the
  jupyterlab-plotly extension, which the explorer does not use, loaded a second copy.
  :func:`voila_options` serves plotly.py's own copy as a static file, :func:`kernel_environment`
  tells the kernels its URL (the page fetches it as a script, compiled in the background), and
  the app leaves the extension out.
"""

from __future__ import annotations

import inspect
import os
from importlib import resources
from pathlib import Path

import nbformat
from jupyter_server.auth.identity import PasswordIdentityProvider
from nbformat.sign import NotebookNotary

KERNEL_IDLE_TIMEOUT_S = 600
"""Seconds a kernel with no open page may stay idle before it is shut down (10 minutes)."""

MAX_CULL_INTERVAL_S = 60
"""The culler looks at most this many seconds apart (more often for short timeouts)."""

REFILL_DELAY_S = 30
"""Seconds Voila waits, after pages take preheated kernels, before starting their replacements.

Each refill imports torch and runs the notebook (a refill used 3.0-3.6 s of CPU during one
page's 6.6-7.3 s first render on two cores); after four pages at once, four refills. A page
opened within this delay after the pool ran empty waits for a kernel of its own, as with no
pool."""

PLOTLY_URL_ENV = "TFA_PLOTLY_URL"
"""The environment variable that gives the kernels the URL of plotly.js (relative to the page),
read by :class:`tfa_widgets.widgets.plotly_view.PlotlyLoader`."""

APP_EXTENSION_DENYLIST = ("jupyterlab-plotly", "@jupyter-notebook/lab-extension")
"""JupyterLab extensions the explorer app does not use: plotly's renderer (4.8 MB of script the
page loads and compiles for nothing: the explorer brings its own plotly.js) and Notebook 7's
(which fails to load in Voila)."""


class XsrfCookieIdentityProvider(PasswordIdentityProvider):
    """Voila's default identity provider, which also sets the ``_xsrf`` cookie on every GET.

    Tornado sets the cookie only when a handler reads ``xsrf_token``; the Voila page handler never
    does, so the page's shutdown beacon (which copies the cookie into its form) was refused.
    """

    async def get_user(self, handler):
        user = super().get_user(handler)
        if inspect.isawaitable(user):
            user = await user
        cookie_name = handler.settings.get("xsrf_cookie_name", "_xsrf")
        missing = not handler.get_cookie(cookie_name)
        if user is not None and handler.request.method == "GET" and missing:
            # Tornado asks for the user while it sets the cookie; jupyter_server only records the
            # user after this method returns, so record it first.
            handler.current_user = user
            handler.xsrf_token  # noqa: B018 - reading it sets the cookie
        return user


def cull_interval_s(idle_timeout_s: int) -> int:
    """Return how often (s) the culler looks, so a kernel ends within ~110% of the timeout."""
    return max(1, min(MAX_CULL_INTERVAL_S, idle_timeout_s // 10))


def plotly_js_dir() -> Path:
    """Return the folder of plotly.py's own ``plotly.min.js`` (the version its figures need)."""
    return Path(str(resources.files("plotly").joinpath("package_data")))


def kernel_environment() -> dict[str, str]:
    """Return the environment variables a Voila started by :func:`voila_options` gives its
    kernels: where the page finds plotly.js (served from :func:`plotly_js_dir`)."""
    return {PLOTLY_URL_ENV: "voila/labextensions/plotly.min.js"}


def voila_options(
    idle_timeout_s: int = KERNEL_IDLE_TIMEOUT_S, pool_size: int = 0, app: bool = False
) -> list[str]:
    """Return Voila command-line options: page-close shutdown, idle culling, quiet kernels,
    plotly.js as a static file.

    Parameters
    ----------
    idle_timeout_s
        Seconds before an idle kernel with no open page is shut down; 0 disables culling.
    pool_size
        Kernels kept ready with the notebook already executed (Voila's ``--preheat_kernel``), so
        a new page shows without waiting for the notebook to run; 0 starts one per page. Used
        kernels are replaced after :data:`REFILL_DELAY_S`.
    app
        Serving the explorer app: leave out the extensions it does not use
        (:data:`APP_EXTENSION_DENYLIST`); other notebooks may need them.
    """
    options = [
        f"--Voila.identity_provider_class={XsrfCookieIdentityProvider.__module__}."
        f"{XsrfCookieIdentityProvider.__name__}",
        f"--MappingKernelManager.cull_idle_timeout={idle_timeout_s}",
        f"--MappingKernelManager.cull_interval={cull_interval_s(idle_timeout_s)}",
        # Served under voila/labextensions/ (no package.json there: not taken for an extension).
        f"--VoilaConfiguration.extra_labextensions_path={plotly_js_dir()}",
    ]
    if os.name == "posix":
        options.append("--KernelManager.transport=ipc")
    if pool_size > 0:
        options += [
            "--preheat_kernel=True",
            f"--pool_size={pool_size}",
            f"--VoilaKernelManager.fill_delay={REFILL_DELAY_S}",
        ]
    if app:
        options += [f"--VoilaConfiguration.extension_denylist={e}" for e in APP_EXTENSION_DENYLIST]
    return options


def trust_notebook(path: Path) -> None:
    """Sign ``path`` in the user's Jupyter signature store (as ``jupyter trust`` does)."""
    notebook = nbformat.read(path, as_version=4)
    NotebookNotary().sign(notebook)
