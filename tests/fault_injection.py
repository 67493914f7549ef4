"""Fault injection for the bad-input tests: run Python code in a child process that SIGKILLs itself at a chosen
moment of a file write, the way a power cut or the OOM killer would.

The hooks wrap the standard library (`open`, `os.fdopen`, `os.replace`), not the package, so the same fault hits the
code whatever way it writes:

- `kill_at_open(name)`: right after a file whose name contains `name` is opened for writing (a `"w"` open has already
  truncated it);
- `kill_mid_write(name)`: in the first write to such a file, after half of the data reached the disk;
- `kill_at_replace(name)`: just before a rename onto such a path (the temporary file is complete, not yet in place);
- `kill_after_calls(module, function, count)`: after `module.function` returned `count` times.
"""

import os
import subprocess
import sys
import textwrap


PRELUDE = textwrap.dedent(
    """
    import builtins, os, signal, sys

    def _die():
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def _fd_path(descriptor):
        try:
            return os.readlink(f"/proc/self/fd/{descriptor}")
        except OSError:
            return ""

    def _writing(mode):
        return any(flag in mode for flag in "wax+")

    class _HalfWriter:
        def __init__(self, handle):
            self._handle = handle
        def write(self, data):
            half = data[: max(1, len(data) // 2)]
            self._handle.write(half)
            self._handle.flush()
            os.fsync(self._handle.fileno())
            _die()
        def __getattr__(self, name):
            return getattr(self._handle, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self._handle.__exit__(*exc)

    def _install_open_hook(name, action):
        real_open, real_fdopen = builtins.open, os.fdopen
        def hooked_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if _writing(mode) and isinstance(file, (str, bytes, os.PathLike)) and name in os.path.basename(os.fsdecode(file)):
                return action(handle)
            return handle
        def hooked_fdopen(descriptor, mode="r", *args, **kwargs):
            handle = real_fdopen(descriptor, mode, *args, **kwargs)
            if _writing(mode) and name in os.path.basename(_fd_path(descriptor)):
                return action(handle)
            return handle
        builtins.open, os.fdopen = hooked_open, hooked_fdopen
    """
)


def kill_at_open(name: str) -> str:
    return PRELUDE + f"\n_install_open_hook({name!r}, lambda handle: _die())\n"


def kill_mid_write(name: str) -> str:
    return PRELUDE + f"\n_install_open_hook({name!r}, _HalfWriter)\n"


def kill_at_replace(name: str) -> str:
    return PRELUDE + textwrap.dedent(
        f"""
        _real_replace = os.replace
        def _hooked_replace(source, destination, *args, **kwargs):
            if {name!r} in os.path.basename(os.fsdecode(destination)):
                _die()
            return _real_replace(source, destination, *args, **kwargs)
        os.replace = _hooked_replace
        """
    )


def kill_after_calls(module: str, function: str, count: int) -> str:
    return PRELUDE + textwrap.dedent(
        f"""
        import importlib
        _module = importlib.import_module({module!r})
        _real = getattr(_module, {function!r})
        _calls = [0]
        def _counted(*args, **kwargs):
            result = _real(*args, **kwargs)
            _calls[0] += 1
            if _calls[0] >= {count}:
                _die()
            return result
        setattr(_module, {function!r}, _counted)
        """
    )


def run_killed(hook: str, code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs `hook` then `code` in a fresh interpreter; asserts that it died of SIGKILL (the fault happened)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(
        [sys.executable, "-c", hook + "\n" + textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert result.returncode == -9, f"the child was not killed (status {result.returncode}):\n{result.stderr[-3000:]}"
    return result


__all__ = ["kill_after_calls", "kill_at_open", "kill_at_replace", "kill_mid_write", "run_killed"]
