"""The broker's policy: every request the brain makes gets a level.

Level A runs. Levels B and C run only once the CLI approved them (the
approval ladder); C is what a shell is, and a shell is recognised by what
the argv does, not by the first word's name: ``env sh -c``, ``busybox sh``,
``python -c``, ``node -e``, ``find -exec``, a ``.bat`` file or
``git -c core.pager=...`` all run code given on the command line. What
leaves the workspace (a cwd or a file outside it) is refused outright
(``POLICY_DENIED``), never asked about: confinement is not a question.

The judgement is data (``policy.json`` beside this module, or a user's file
of the same shape), so people can read and change it without reading code.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from ..errors import ShimError

LEVELS = ("A", "B", "C")
SCHEMA_VERSION = 1
_DEFAULT = Path(__file__).with_name("policy.json")


class PolicyFileError(ShimError):
    code = "INVALID_CONFIG"


@dataclass(frozen=True)
class Verdict:
    """Where a request stands: refused (``level`` None), or the level it needs."""

    level: str | None
    reason: str
    subject: str = ""  # what an approval "for this session" covers: a program, or a method


def _program(command: str) -> tuple[str, str]:
    """A command's program name as the policy spells it, and its extension:
    the last path component (either separator), lower-cased, ``.exe``/``.com``
    dropped (``C:\\Windows\\System32\\CMD.EXE`` is ``cmd``)."""
    name = PureWindowsPath(PurePosixPath(command).name).name.lower()
    stem, dot, ext = name.rpartition(".")
    if dot and stem and f".{ext}" in (".exe", ".com"):
        return stem, ""
    return name, f".{ext}" if dot and stem else ""


@dataclass(frozen=True)
class Policy:
    doc: dict[str, Any]

    @classmethod
    def load(cls, path: Path | None = None) -> Policy:
        source = path or _DEFAULT
        try:
            doc = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PolicyFileError(
                f"cannot read the broker policy {source}: {exc}",
                hint="give a JSON file of the shape of the shim's own policy.json",
            ) from None
        if not isinstance(doc, dict) or doc.get("schemaVersion") != SCHEMA_VERSION:
            raise PolicyFileError(f"{source} is not a version {SCHEMA_VERSION} broker policy")
        if doc.get("unknownProgram") not in LEVELS or any(v not in LEVELS for v in doc.get("programs", {}).values()):
            raise PolicyFileError(f"{source}: levels are A, B or C")
        return cls(doc)

    # -- commands ------------------------------------------------------------------------
    def command(self, argv: list[str], shell_mode: bool = False, env: tuple[str, ...] = ()) -> Verdict:
        """The level an argv needs, after every wrapper in front of it is looked
        through. What it runs with counts too: a variable that makes programs
        load code (``LD_PRELOAD``, ``PATH``, ``NODE_OPTIONS``...) is a shell's
        worth, any other variable lifts level A to B, and so does an argument
        naming a path outside the workspace (``cat ~/.ssh/id_rsa``)."""
        if shell_mode:
            return Verdict("C", "a shell was asked for (mode: shell)", "shell")
        assigned = list(env)
        verdict = self._command(argv, assigned)
        code = self.doc.get("codeVariables", {})
        loads = next((v for v in assigned if v.upper() in code.get("names", ())
                      or v.upper().startswith(tuple(code.get("prefixes", ())))), None)  # fmt: skip
        if verdict.level is not None and loads is not None:
            return Verdict("C", f"{verdict.subject} with {loads} set: that variable makes programs run other code",
                           verdict.subject)  # fmt: skip
        if verdict.level == "A":
            if assigned:
                return Verdict("B", f"{verdict.subject} with its environment changed ({', '.join(assigned)})",
                               verdict.subject)  # fmt: skip
            outside = next((a for a in self._args_of(argv, verdict.subject) if _names_outside(a)), None)
            if outside is not None:
                return Verdict("B", f"{verdict.subject} {outside}: names a path outside the workspace", verdict.subject)
        return verdict

    def _args_of(self, argv: list[str], program: str) -> list[str]:
        """The arguments after the program itself (wrappers in front included: conservative)."""
        names = [_program(a)[0] for a in argv]
        return argv[names.index(program) + 1 :] if program in names else argv[1:]

    def _command(self, argv: list[str], assigned: list[str]) -> Verdict:
        seen = 0
        while argv:
            seen += 1
            if seen > 16:
                return Verdict("C", "more than 16 wrappers deep: treated as a shell", "shell")
            name, ext = _program(argv[0])
            if name in self.doc["shells"]:
                return Verdict("C", f"{name} is a shell", name)
            if ext in self.doc["scriptExtensions"]:
                return Verdict("C", f"{argv[0]} is a script ({ext}) run by its interpreter", name)
            if name in self.doc["asShellAlways"]:
                return Verdict("C", f"{name} runs commands of its own (from its arguments or files): "
                               "treated as a shell", name)  # fmt: skip
            wrapper = self.doc["wrappers"].get(name)
            if wrapper is not None:
                unwrapped = self._unwrap(argv[1:], wrapper, assigned)
                if isinstance(unwrapped, Verdict):
                    return unwrapped
                if not unwrapped:
                    return Verdict(self.doc["unknownProgram"], f"{name} on its own", name)
                argv = unwrapped
                continue
            inline = self.doc["interpreters"].get(name)
            if inline is not None:
                code = next((a for a in argv[1:] if _is_flag(a, inline)), None)
                if code is not None:
                    return Verdict("C", f"{name} {code} runs code given on its command line: a shell in all but name",
                                   name)  # fmt: skip
                return Verdict(self.doc["unknownProgram"], f"{name} runs a program of its own", name)
            risky = self.doc["asShellWith"].get(name, [])
            flag = next((a for a in argv[1:] if _is_flag(a, risky)), None)
            if flag is not None:
                return Verdict("C", f"{name} {flag} runs another command: treated as a shell", name)
            level = self.doc["programs"].get(name, self.doc["unknownProgram"])
            why = "a program that only reads, prints or waits" if level == "A" else "a program the policy does not know"
            return Verdict(level, f"{name}: {why}", name)
        return Verdict(None, "an empty command")

    def _unwrap(self, rest: list[str], spec: dict[str, Any], assigned: list[str]) -> list[str] | Verdict:
        """What a wrapper (env, nice, timeout, sudo, xargs, busybox...) runs: its argv after its own options."""
        values = set(spec.get("valueOptions", []))
        splits = set(spec.get("splitOptions", []))
        prefixes = tuple(spec.get("valuePrefixes", []))
        i = 0
        while i < len(rest):
            arg = rest[i]
            if arg == "--":
                i += 1
                break
            option, _, attached = arg.partition("=")
            if option in splits or (arg[:2] in splits and len(arg) > 2):
                text = attached or (arg[2:] if arg[:2] in splits and len(arg) > 2 else rest[i + 1] if i + 1 < len(rest)
                                    else "")  # fmt: skip
                try:
                    inner = shlex.split(text)
                except ValueError:
                    return Verdict("C", f"{arg} splits an unparsable string into a command: treated as a shell",
                                   "shell")  # fmt: skip
                tail = rest[i + (1 if attached or len(arg) > 2 else 2) :]
                return inner + tail
            if option in values and not attached:
                i += 2
                continue
            if (arg.startswith("-") and len(arg) > 1) or (prefixes and arg.lower().startswith(prefixes)):
                i += 1
                continue
            if spec.get("assignments") and "=" in arg and not arg.startswith("="):
                assigned.append(arg.partition("=")[0])
                i += 1
                continue
            break
        return rest[i + int(spec.get("skipPositional", 0)) :]

    # -- requests --------------------------------------------------------------------------
    def judge(self, method: str, params: dict[str, Any]) -> Verdict:
        if method in ("execute", "powershell"):
            if method == "powershell":
                return Verdict("C", "a PowerShell script", "powershell")
            command = params.get("command")
            args = params.get("args") or []
            env = params.get("env") or {}
            if not isinstance(command, str) or not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                return Verdict(None, "execute needs a command string and string args")
            if not isinstance(env, dict):
                return Verdict(None, "execute's env must be an object")
            return self.command([command, *args], params.get("mode", "exec") == "shell", tuple(map(str, env)))
        if method in ("readFile", "listDir", "writeFile", "ping", "amsiScan"):
            return Verdict("A", f"{method} inside the workspace" if "File" in method or method == "listDir"
                           else method, method)  # fmt: skip
        return Verdict("A", "no policy applies", method)


def _names_outside(arg: str) -> bool:
    """An argument (or an option's ``=value``) that is an absolute, home or
    drive path, or climbs with ``..``: it may name something outside the
    workspace, which the command's own working directory does not confine."""
    value = arg.partition("=")[2] if arg.startswith("-") and "=" in arg else arg
    parts = value.replace("\\", "/").split("/")
    return value.startswith(("/", "~", "\\")) or (len(value) > 1 and value[1] == ":") or ".." in parts


def _is_flag(arg: str, flags: list[str]) -> bool:
    """``arg`` is one of ``flags``: exactly, with an attached ``=value``, or a
    short flag bundled with others (``-Bc`` holds ``-c``; ``-ecode`` is ``-e``)."""
    for flag in flags:
        if arg == flag or (flag.startswith("--") and arg.startswith(flag + "=")):
            return True
        short = len(flag) == 2 and flag[0] == "-"
        if short and arg.startswith("-") and not arg.startswith("--") and flag[1] in arg[1:]:
            return True
    return False


__all__ = [
    "LEVELS",
    "Policy",
    "PolicyFileError",
    "Verdict",
]
