"""Win32 for the brain: AppContainer profile, a locked-down named pipe, the
launch inside the container, AMSI. ctypes against the documented APIs.

The pure parts (the pipe's SDDL, structures, command-line quoting, the
environment block) are plain functions tested on every platform. The calls
into Windows are defined only on Windows (``sys.platform == "win32"``) and
run by the Windows job of the release workflow; they cannot run here.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import sys
from collections.abc import Iterator, Mapping
from ctypes import wintypes

PROFILE = "TerminAI_Brain_Sandbox"
CAPABILITIES = {"internetClient": "S-1-15-3-1", "privateNetworkClientServer": "S-1-15-3-3"}
SE_GROUP_ENABLED = 0x4
PROC_THREAD_ATTRIBUTE_SECURITY_CAPABILITIES = 0x20009
EXTENDED_STARTUPINFO_PRESENT = 0x80000
CREATE_UNICODE_ENVIRONMENT = 0x400
CREATE_NO_WINDOW = 0x08000000
PIPE_ACCESS_DUPLEX = 0x3
FILE_FLAG_FIRST_PIPE_INSTANCE = 0x80000
PIPE_TYPE_BYTE, PIPE_READMODE_BYTE, PIPE_WAIT, PIPE_REJECT_REMOTE_CLIENTS = 0x0, 0x0, 0x0, 0x8
_SID = re.compile(r"^S-1-\d+(-\d+)+$")
_SESSION = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


def pipe_name(session_id: str) -> str:
    if not _SESSION.match(session_id):
        raise ValueError(f"session id {session_id!r} is not 8-64 letters, digits, '-' or '_'")
    return rf"\\.\pipe\terminai-{session_id}"


def pipe_sddl(user_sid: str, appcontainer_sid: str) -> str:
    """The pipe's security descriptor: a protected DACL (nothing inherited)
    granting full access to the owning user and read/write to the brain's
    AppContainer, and nobody else; a low mandatory label so the AppContainer
    (low integrity) may open it for writing."""
    for sid in (user_sid, appcontainer_sid):
        if not _SID.match(sid):
            raise ValueError(f"{sid!r} is not a SID string")
    return f"D:P(A;;GA;;;{user_sid})(A;;GRGW;;;{appcontainer_sid})S:(ML;;NW;;;LW)"


def final_path_inside(final: str, root_final: str) -> bool:
    """Whether a handle's final path (``GetFinalPathNameByHandleW``: ``\\\\?\\C:\\...``
    or ``\\\\?\\UNC\\...``) is the workspace's or lies under it, compared as
    Windows compares names (case-insensitively), on component boundaries."""

    def canonical(path: str) -> str:
        path = path.replace("/", "\\")
        for prefix in ("\\\\?\\UNC\\", "\\\\?\\"):
            if path.startswith(prefix):
                path = ("\\\\" if prefix.endswith("UNC\\") else "") + path[len(prefix) :]
                break
        return path.rstrip("\\").casefold()

    inner, root = canonical(final), canonical(root_final)
    return inner == root or inner.startswith(root + "\\")


def quote_arg(arg: str) -> str:
    """One argument as CommandLineToArgvW and the C runtime parse it back."""
    if arg and not any(c in arg for c in ' \t\n\v"'):
        return arg
    out, backslashes = ['"'], 0
    for c in arg:
        if c == "\\":
            backslashes += 1
        elif c == '"':
            out.append("\\" * (2 * backslashes + 1) + '"')
            backslashes = 0
        else:
            out.append("\\" * backslashes + c)
            backslashes = 0
    out.append("\\" * (2 * backslashes) + '"')
    return "".join(out)


def command_line(argv: list[str]) -> str:
    return " ".join(quote_arg(a) for a in argv)


def environment_block(env: Mapping[str, str]) -> str:
    """A CREATE_UNICODE_ENVIRONMENT block: ``K=V`` entries sorted without
    regard to case, each NUL-terminated, and a final NUL."""
    for key, value in env.items():
        if not key or "=" in key[1:] or "\0" in key or "\0" in value:
            raise ValueError(f"environment entry {key!r} cannot be passed to CreateProcess")
    entries = [f"{k}={v}" for k, v in sorted(env.items(), key=lambda kv: kv[0].upper())]
    return "\0".join(entries) + "\0\0"


def brain_environment(
    base: Mapping[str, str], pipe: str, token: str, workspace: str, cli_version: str
) -> dict[str, str]:
    """What the brain reads at start. Only a few variables of the host's own
    environment pass: the AppContainer must not inherit secrets by accident."""
    keep = ("SYSTEMROOT", "SYSTEMDRIVE", "WINDIR", "TEMP", "TMP", "PATHEXT", "COMSPEC", "PATH", "LANG")
    env = {k: v for k, v in base.items() if k.upper() in keep}
    env.update({"TERMINAI_BROKER_PIPE": pipe, "TERMINAI_HANDSHAKE_TOKEN": token,
                "TERMINAI_WORKSPACE_PATH": workspace, "TERMINAI_CLI_VERSION": cli_version})  # fmt: skip
    return env


DWORD = ctypes.c_uint32  # wintypes.DWORD is a C long: 8 bytes off Windows, and these layouts are Windows'


class SID_AND_ATTRIBUTES(ctypes.Structure):
    _fields_ = [("Sid", ctypes.c_void_p), ("Attributes", DWORD)]


class SECURITY_CAPABILITIES(ctypes.Structure):
    _fields_ = [
        ("AppContainerSid", ctypes.c_void_p),
        ("Capabilities", ctypes.POINTER(SID_AND_ATTRIBUTES)),
        ("CapabilityCount", DWORD),
        ("Reserved", DWORD),
    ]


# Job objects: the brain and every command the broker starts run in one whose
# closing (or the timeout) ends the whole tree; a process is created suspended
# and assigned before it runs, so nothing it starts escapes the job.
CREATE_SUSPENDED = 0x4
JOB_OBJECT_LIMIT_DIE_ON_UNHANDLED_EXCEPTION = 0x400
JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x2000
JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS = 9


class IO_COUNTERS(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("ReadOperationCount", "WriteOperationCount",
                                                     "OtherOperationCount", "ReadTransferCount",
                                                     "WriteTransferCount", "OtherTransferCount")]  # fmt: skip


class JOBOBJECT_BASIC_LIMIT_INFORMATION(ctypes.Structure):
    _fields_ = [("PerProcessUserTimeLimit", ctypes.c_int64), ("PerJobUserTimeLimit", ctypes.c_int64),
                ("LimitFlags", ctypes.c_uint32), ("MinimumWorkingSetSize", ctypes.c_size_t),
                ("MaximumWorkingSetSize", ctypes.c_size_t), ("ActiveProcessLimit", ctypes.c_uint32),
                ("Affinity", ctypes.c_size_t), ("PriorityClass", ctypes.c_uint32),
                ("SchedulingClass", ctypes.c_uint32)]  # fmt: skip


class JOBOBJECT_EXTENDED_LIMIT_INFORMATION(ctypes.Structure):
    _fields_ = [("BasicLimitInformation", JOBOBJECT_BASIC_LIMIT_INFORMATION), ("IoInfo", IO_COUNTERS),
                ("ProcessMemoryLimit", ctypes.c_size_t), ("JobMemoryLimit", ctypes.c_size_t),
                ("PeakProcessMemoryUsed", ctypes.c_size_t), ("PeakJobMemoryUsed", ctypes.c_size_t)]  # fmt: skip


def job_limits() -> JOBOBJECT_EXTENDED_LIMIT_INFORMATION:
    """Kill every process in the job when its last handle closes; a crash
    dialog never keeps one alive."""
    info = JOBOBJECT_EXTENDED_LIMIT_INFORMATION()
    info.BasicLimitInformation.LimitFlags = (JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
                                             | JOB_OBJECT_LIMIT_DIE_ON_UNHANDLED_EXCEPTION)  # fmt: skip
    return info


if sys.platform == "win32":  # pragma: no cover - exercised by the Windows CI job
    _k32 = ctypes.WinDLL("kernel32", use_last_error=True)
    _adv = ctypes.WinDLL("advapi32", use_last_error=True)
    _userenv = ctypes.WinDLL("userenv", use_last_error=True)

    class STARTUPINFOW(ctypes.Structure):
        _fields_ = [("cb", wintypes.DWORD), ("lpReserved", wintypes.LPWSTR), ("lpDesktop", wintypes.LPWSTR),
                    ("lpTitle", wintypes.LPWSTR), ("dwX", wintypes.DWORD), ("dwY", wintypes.DWORD),
                    ("dwXSize", wintypes.DWORD), ("dwYSize", wintypes.DWORD), ("dwXCountChars", wintypes.DWORD),
                    ("dwYCountChars", wintypes.DWORD), ("dwFillAttribute", wintypes.DWORD),
                    ("dwFlags", wintypes.DWORD), ("wShowWindow", wintypes.WORD), ("cbReserved2", wintypes.WORD),
                    ("lpReserved2", ctypes.c_void_p), ("hStdInput", wintypes.HANDLE),
                    ("hStdOutput", wintypes.HANDLE), ("hStdError", wintypes.HANDLE)]  # fmt: skip

    class STARTUPINFOEXW(ctypes.Structure):
        _fields_ = [("StartupInfo", STARTUPINFOW), ("lpAttributeList", ctypes.c_void_p)]

    class PROCESS_INFORMATION(ctypes.Structure):
        _fields_ = [("hProcess", wintypes.HANDLE), ("hThread", wintypes.HANDLE), ("dwProcessId", wintypes.DWORD),
                    ("dwThreadId", wintypes.DWORD)]  # fmt: skip

    class SECURITY_ATTRIBUTES(ctypes.Structure):
        _fields_ = [("nLength", wintypes.DWORD), ("lpSecurityDescriptor", ctypes.c_void_p),
                    ("bInheritHandle", wintypes.BOOL)]  # fmt: skip

    def _check(ok: int, what: str) -> None:
        if not ok:
            raise OSError(ctypes.get_last_error(), f"{what} failed: {ctypes.FormatError(ctypes.get_last_error())}")

    def _sid_string(psid: int) -> str:
        out = wintypes.LPWSTR()
        _check(_adv.ConvertSidToStringSidW(ctypes.c_void_p(psid), ctypes.byref(out)), "ConvertSidToStringSidW")
        try:
            return str(out.value)
        finally:
            _k32.LocalFree(out)

    def _sid(text: str) -> ctypes.c_void_p:
        psid = ctypes.c_void_p()
        _check(_adv.ConvertStringSidToSidW(text, ctypes.byref(psid)), "ConvertStringSidToSidW")
        return psid

    def current_user_sid() -> str:
        token = wintypes.HANDLE()
        _check(_adv.OpenProcessToken(_k32.GetCurrentProcess(), 0x0008, ctypes.byref(token)), "OpenProcessToken")
        size = wintypes.DWORD()
        _adv.GetTokenInformation(token, 1, None, 0, ctypes.byref(size))  # TokenUser: ask for the size
        buf = ctypes.create_string_buffer(size.value)
        _check(_adv.GetTokenInformation(token, 1, buf, size, ctypes.byref(size)), "GetTokenInformation")
        _k32.CloseHandle(token)
        return _sid_string(ctypes.cast(buf, ctypes.POINTER(ctypes.c_void_p))[0] or 0)

    def ensure_profile(name: str = PROFILE) -> str:
        """The AppContainer profile's SID, creating the profile on first use."""
        caps = (SID_AND_ATTRIBUTES * len(CAPABILITIES))(
            *[SID_AND_ATTRIBUTES(_sid(s).value, SE_GROUP_ENABLED) for s in CAPABILITIES.values()]
        )
        psid = ctypes.c_void_p()
        hr = _userenv.CreateAppContainerProfile(name, name, "TerminAI brain", caps, len(CAPABILITIES),
                                                ctypes.byref(psid))  # fmt: skip
        if hr & 0xFFFFFFFF == 0x800700B7:  # HRESULT_FROM_WIN32(ERROR_ALREADY_EXISTS)
            hr = _userenv.DeriveAppContainerSidFromAppContainerName(name, ctypes.byref(psid))
        if hr != 0:
            raise OSError(hr, f"AppContainer profile {name}: HRESULT {hr & 0xFFFFFFFF:#x}")
        return _sid_string(psid.value or 0)

    class PipeStream:
        """A connected pipe instance with the socket methods the broker uses."""

        def __init__(self, handle: int) -> None:
            self.handle = handle

        def recv(self, size: int) -> bytes:
            buf = ctypes.create_string_buffer(size)
            got = wintypes.DWORD()
            if not _k32.ReadFile(self.handle, buf, size, ctypes.byref(got), None):
                return b""  # broken pipe: the client went away
            return buf.raw[: got.value]

        def sendall(self, data: bytes) -> None:
            done = wintypes.DWORD()
            _check(_k32.WriteFile(self.handle, data, len(data), ctypes.byref(done), None), "WriteFile")

        def shutdown(self, how: int) -> None:
            _k32.DisconnectNamedPipe(self.handle)

        def close(self) -> None:
            _k32.CloseHandle(self.handle)

    class PipeListener:
        """``accept`` creates the next pipe instance with the DACL and waits for a client."""

        def __init__(self, name: str, sddl: str) -> None:
            self.name, self.sddl, self.first = name, sddl, True

        def accept(self) -> tuple[PipeStream, None]:
            sd = ctypes.c_void_p()
            _check(_adv.ConvertStringSecurityDescriptorToSecurityDescriptorW(self.sddl, 1, ctypes.byref(sd), None),
                   "ConvertStringSecurityDescriptorToSecurityDescriptorW")  # fmt: skip
            sa = SECURITY_ATTRIBUTES(ctypes.sizeof(SECURITY_ATTRIBUTES), sd, False)
            mode = PIPE_ACCESS_DUPLEX | (FILE_FLAG_FIRST_PIPE_INSTANCE if self.first else 0)
            handle = _k32.CreateNamedPipeW(self.name, mode,
                                           PIPE_TYPE_BYTE | PIPE_READMODE_BYTE | PIPE_WAIT | PIPE_REJECT_REMOTE_CLIENTS,
                                           255, 65536, 65536, 0, ctypes.byref(sa))  # fmt: skip
            _k32.LocalFree(sd)
            if handle in (None, -1, 0xFFFFFFFFFFFFFFFF):
                _check(0, "CreateNamedPipeW")
            self.first = False
            if not _k32.ConnectNamedPipe(handle, None) and ctypes.get_last_error() != 535:  # PIPE_CONNECTED
                _check(0, "ConnectNamedPipe")
            return PipeStream(handle), None

        def close(self) -> None:
            pass

    def launch_in_appcontainer(
        argv: list[str], env: Mapping[str, str], cwd: str | None, appcontainer_sid: str
    ) -> tuple[int, int, int]:
        """Start ``argv`` inside the AppContainer with its capabilities, in a job
        that ends its whole tree; returns the pid, process handle and job handle."""
        caps = (SID_AND_ATTRIBUTES * len(CAPABILITIES))(
            *[SID_AND_ATTRIBUTES(_sid(s).value, SE_GROUP_ENABLED) for s in CAPABILITIES.values()]
        )
        sc = SECURITY_CAPABILITIES(_sid(appcontainer_sid).value, caps, len(CAPABILITIES), 0)
        size = ctypes.c_size_t()
        _k32.InitializeProcThreadAttributeList(None, 1, 0, ctypes.byref(size))
        attrs = ctypes.create_string_buffer(size.value)
        _check(_k32.InitializeProcThreadAttributeList(attrs, 1, 0, ctypes.byref(size)),
               "InitializeProcThreadAttributeList")  # fmt: skip
        _check(_k32.UpdateProcThreadAttribute(attrs, 0, PROC_THREAD_ATTRIBUTE_SECURITY_CAPABILITIES,
                                              ctypes.byref(sc), ctypes.sizeof(sc), None, None),
               "UpdateProcThreadAttribute")  # fmt: skip
        si = STARTUPINFOEXW()
        si.StartupInfo.cb = ctypes.sizeof(STARTUPINFOEXW)
        si.lpAttributeList = ctypes.cast(attrs, ctypes.c_void_p)
        pi = PROCESS_INFORMATION()
        block = ctypes.create_unicode_buffer(environment_block(env))
        cmd = ctypes.create_unicode_buffer(command_line(argv))
        flags = EXTENDED_STARTUPINFO_PRESENT | CREATE_UNICODE_ENVIRONMENT | CREATE_NO_WINDOW | CREATE_SUSPENDED
        _check(_k32.CreateProcessW(None, cmd, None, None, False, flags, block, cwd, ctypes.byref(si),
                                   ctypes.byref(pi)), "CreateProcessW")  # fmt: skip
        _k32.DeleteProcThreadAttributeList(attrs)
        job = new_job()
        try:
            adopt_suspended(job, pi.hProcess, pi.dwProcessId, pi.hThread)
        except OSError:
            _k32.TerminateProcess(pi.hProcess, 1)
            _k32.CloseHandle(job)
            raise
        finally:
            _k32.CloseHandle(pi.hThread)
        return int(pi.dwProcessId), int(pi.hProcess or 0), job

    def new_job() -> int:
        """A job object that kills its processes when closed (``job_limits``)."""
        job = _k32.CreateJobObjectW(None, None)
        _check(job, "CreateJobObjectW")
        info = job_limits()
        _check(_k32.SetInformationJobObject(job, JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS, ctypes.byref(info),
                                            ctypes.sizeof(info)), "SetInformationJobObject")  # fmt: skip
        return int(job)

    def adopt_suspended(job: int, process_handle: int, pid: int, thread_handle: int = 0) -> None:
        """Put a process created with CREATE_SUSPENDED into the job, then let it run."""
        _check(_k32.AssignProcessToJobObject(job, process_handle), "AssignProcessToJobObject")
        if thread_handle:
            _check(_k32.ResumeThread(thread_handle) != 0xFFFFFFFF, "ResumeThread")
            return
        # subprocess.Popen keeps no thread handle: find the process's one (suspended) thread.
        snapshot = _k32.CreateToolhelp32Snapshot(0x4, 0)  # TH32CS_SNAPTHREAD

        class THREADENTRY32(ctypes.Structure):
            _fields_ = [("dwSize", wintypes.DWORD), ("cntUsage", wintypes.DWORD), ("th32ThreadID", wintypes.DWORD),
                        ("th32OwnerProcessID", wintypes.DWORD), ("tpBasePri", wintypes.LONG),
                        ("tpDeltaPri", wintypes.LONG), ("dwFlags", wintypes.DWORD)]  # fmt: skip

        entry = THREADENTRY32()
        entry.dwSize = ctypes.sizeof(THREADENTRY32)
        try:
            more = _k32.Thread32First(snapshot, ctypes.byref(entry))
            while more:
                if entry.th32OwnerProcessID == pid:
                    thread = _k32.OpenThread(0x0002, False, entry.th32ThreadID)  # THREAD_SUSPEND_RESUME
                    _check(thread, "OpenThread")
                    try:
                        _check(_k32.ResumeThread(thread) != 0xFFFFFFFF, "ResumeThread")
                    finally:
                        _k32.CloseHandle(thread)
                more = _k32.Thread32Next(snapshot, ctypes.byref(entry))
        finally:
            _k32.CloseHandle(snapshot)

    def terminate_job(job: int, code: int = 1) -> None:
        _k32.TerminateJobObject(job, code)

    def close_handle(handle: int) -> None:
        _k32.CloseHandle(handle)

    def stop_process(handle: int, timeout: float, job: int = 0) -> int | None:
        """Wait for the brain to exit; terminate it if it does not; close the
        handle, and the job (which ends whatever the brain started)."""
        try:
            if _k32.WaitForSingleObject(handle, int(timeout * 1000)) != 0:  # not WAIT_OBJECT_0
                _k32.TerminateProcess(handle, 1)
                _k32.WaitForSingleObject(handle, 5000)
            code = wintypes.DWORD()
            _k32.GetExitCodeProcess(handle, ctypes.byref(code))
            return int(code.value)
        finally:
            _k32.CloseHandle(handle)
            if job:
                _k32.CloseHandle(job)

    GENERIC_READ, FILE_READ_ATTRIBUTES = 0x80000000, 0x80
    FILE_SHARE_READ, FILE_SHARE_WRITE, OPEN_EXISTING = 0x1, 0x2, 3
    FILE_FLAG_BACKUP_SEMANTICS, FILE_FLAG_OPEN_REPARSE_POINT = 0x02000000, 0x00200000
    FILE_ATTRIBUTE_REPARSE_POINT = 0x400

    class BY_HANDLE_FILE_INFORMATION(ctypes.Structure):
        _fields_ = [("dwFileAttributes", wintypes.DWORD), ("ftCreationTime", wintypes.FILETIME),
                    ("ftLastAccessTime", wintypes.FILETIME), ("ftLastWriteTime", wintypes.FILETIME),
                    ("dwVolumeSerialNumber", wintypes.DWORD), ("nFileSizeHigh", wintypes.DWORD),
                    ("nFileSizeLow", wintypes.DWORD), ("nNumberOfLinks", wintypes.DWORD),
                    ("nFileIndexHigh", wintypes.DWORD), ("nFileIndexLow", wintypes.DWORD)]  # fmt: skip

    def _final_path(handle: int) -> str:
        buf = ctypes.create_unicode_buffer(32768)
        n = _k32.GetFinalPathNameByHandleW(wintypes.HANDLE(handle), buf, len(buf), 0)
        _check(n, "GetFinalPathNameByHandleW")
        return str(buf.value)

    @contextlib.contextmanager
    def pinned(root: str, path: str) -> Iterator[str]:
        """``path`` opened as a handle that nobody may rename or delete while it
        is held (no FILE_SHARE_DELETE: neither it nor a directory above it can
        then be swapped for a junction), checked to be no reparse point itself
        and to lie under the workspace by the handle's final path; yields that
        final path, valid while the handle is held."""
        flags = FILE_FLAG_BACKUP_SEMANTICS | FILE_FLAG_OPEN_REPARSE_POINT
        handle = _k32.CreateFileW(path, FILE_READ_ATTRIBUTES, FILE_SHARE_READ | FILE_SHARE_WRITE, None,
                                  OPEN_EXISTING, flags, None)  # fmt: skip
        if handle in (None, -1, 0xFFFFFFFFFFFFFFFF):
            _check(0, f"CreateFileW {path}")
        try:
            info = BY_HANDLE_FILE_INFORMATION()
            _check(_k32.GetFileInformationByHandle(handle, ctypes.byref(info)), "GetFileInformationByHandle")
            if info.dwFileAttributes & FILE_ATTRIBUTE_REPARSE_POINT:
                raise PermissionError(13, f"{path} is a reparse point (a link or junction): not followed")
            root_handle = _k32.CreateFileW(root, FILE_READ_ATTRIBUTES, FILE_SHARE_READ | FILE_SHARE_WRITE, None,
                                           OPEN_EXISTING, FILE_FLAG_BACKUP_SEMANTICS, None)  # fmt: skip
            try:
                root_final = _final_path(root_handle)
            finally:
                _k32.CloseHandle(root_handle)
            final = _final_path(handle)
            if not final_path_inside(final, root_final):
                raise PermissionError(13, f"{path} resolves to {final}, outside the workspace")
            yield final
        finally:
            _k32.CloseHandle(handle)

    def amsi_scan(content: str, filename: str) -> bool:
        """True when Windows' antimalware scan judges the content malicious."""
        amsi = ctypes.WinDLL("amsi", use_last_error=True)
        context, session = ctypes.c_void_p(), ctypes.c_void_p()
        hr = amsi.AmsiInitialize("TerminAI", ctypes.byref(context))
        if hr != 0:
            raise OSError(hr, "AmsiInitialize failed")
        try:
            result = ctypes.c_int()
            hr = amsi.AmsiScanString(context, content, filename, session, ctypes.byref(result))
            if hr != 0:
                raise OSError(hr, "AmsiScanString failed")
            return result.value >= 32768  # AMSI_RESULT_DETECTED
        finally:
            amsi.AmsiUninitialize(context)


__all__ = [
    "CAPABILITIES",
    "CREATE_NO_WINDOW",
    "CREATE_SUSPENDED",
    "CREATE_UNICODE_ENVIRONMENT",
    "DWORD",
    "EXTENDED_STARTUPINFO_PRESENT",
    "FILE_FLAG_FIRST_PIPE_INSTANCE",
    "IO_COUNTERS",
    "JOBOBJECT_BASIC_LIMIT_INFORMATION",
    "JOBOBJECT_EXTENDED_LIMIT_INFORMATION",
    "JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS",
    "JOB_OBJECT_LIMIT_DIE_ON_UNHANDLED_EXCEPTION",
    "JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE",
    "PIPE_ACCESS_DUPLEX",
    "PIPE_READMODE_BYTE",
    "PIPE_REJECT_REMOTE_CLIENTS",
    "PIPE_TYPE_BYTE",
    "PIPE_WAIT",
    "PROC_THREAD_ATTRIBUTE_SECURITY_CAPABILITIES",
    "PROFILE",
    "SECURITY_CAPABILITIES",
    "SE_GROUP_ENABLED",
    "SID_AND_ATTRIBUTES",
    "brain_environment",
    "command_line",
    "environment_block",
    "final_path_inside",
    "job_limits",
    "pipe_name",
    "pipe_sddl",
    "quote_arg",
]
