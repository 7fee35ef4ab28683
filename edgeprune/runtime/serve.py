"""``edgeprune serve DIR``: the artifact's demo page on loopback (Python's ``http.server``, no PyTorch).

The folder is served as it is, with the headers that make the page cross-origin isolated
(``Cross-Origin-Opener-Policy: same-origin``, ``Cross-Origin-Embedder-Policy: require-corp``), which ONNX Runtime
Web needs for more than one WASM thread (SharedArrayBuffer). ``--lib DIR`` (repeatable) serves local folders at
``/lib/``, the first that has the file answering: transformers.js 4's ``dist/`` and ONNX Runtime Web's ``dist/``
(transformers.js 4 no longer ships the WASM binaries; the page then loads nothing from a CDN).
"""
from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path
from typing import Optional

from edgeprune.errors import ConfigError, ModelError
from edgeprune.runtime.manifest import read_manifest


class Handler(http.server.SimpleHTTPRequestHandler):
    lib: tuple[Path, ...] = ()
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".js": "text/javascript", ".wasm": "application/wasm", ".onnx": "application/octet-stream",
                      ".json": "application/json"}

    def translate_path(self, path: str) -> str:
        clean = path.split("?", 1)[0].split("#", 1)[0]
        if self.lib and clean.startswith("/lib/"):
            for folder in self.lib:
                target = (folder / clean[len("/lib/"):]).resolve()
                if target.is_relative_to(folder.resolve()) and target.is_file():
                    return str(target)
            return str(self.lib[0] / "missing")
        return super().translate_path(path)

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, fmt: str, *args) -> None:  # quiet: one line per failed request only
        if len(args) > 1 and str(args[1]).startswith(("4", "5")):
            super().log_message(fmt, *args)


def _check_artifact(directory: Path) -> None:
    """The manifest's schema, and its input names and padding id against the graph and the tokenizer the page
    will load (as ``check`` and ``EdgeModel`` do)."""
    from edgeprune.runtime.layout import model_file
    from edgeprune.runtime.manifest import check_against, graph_io, vocab_size

    manifest = read_manifest(directory)
    _, inputs = graph_io(model_file(directory, manifest))
    check_against(manifest, directory, inputs, vocab_size(directory))


def server(directory: str | Path, host: str = "127.0.0.1", port: int = 8000,
           lib=None) -> http.server.ThreadingHTTPServer:
    """A server for the artifact in ``directory`` (not started; ``port=0`` picks a free port)."""
    directory = Path(directory)
    _check_artifact(directory)  # an artifact whose manifest fits its graph and tokenizer, or a one-line error
    if not (directory / "demo" / "index.html").is_file():
        raise ModelError(f"{directory}: no demo/index.html (built before the demo page existed); rebuild the artifact")
    libs = tuple(Path(p) for p in ([lib] if isinstance(lib, (str, Path)) else lib or ()))
    if libs and not any((d / "transformers.min.js").is_file() for d in libs):
        raise ConfigError(f"--lib {' '.join(map(str, libs))}: no transformers.min.js there; give the dist/ folder of "
                          "@huggingface/transformers (and onnxruntime-web's dist/ for its WASM files)")
    handler = type("ArtifactHandler", (Handler,), {"lib": libs})
    try:
        return http.server.ThreadingHTTPServer((host, port), functools.partial(handler, directory=str(directory)))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None


def serve_in_background(directory: str | Path, lib=None) -> tuple[str, callable]:
    """Start a server on a free loopback port in a thread; returns the demo's URL and a stop function."""
    srv = server(directory, port=0, lib=lib)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        srv.shutdown()
        srv.server_close()

    return f"http://127.0.0.1:{srv.server_address[1]}/demo/index.html", stop
