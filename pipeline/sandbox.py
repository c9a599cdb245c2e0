"""Run untrusted Python (model-written code) against unit tests, contained.

The code reward of the RL stage (DESIGN.md §6) scores a completion by the
fraction of the task's tests it passes. The completion is hostile in the worst
case (it was optimised against this reward), so it runs in a child process
with several independent barriers; any one of them failing still leaves the
others:

1. Operating system, checked once per process and reported by
   `isolation_report()`:
   - a new network namespace (no network: only a loopback that is down),
   - a new PID namespace with a private /proc (the child cannot see, signal
     or read the environment of any process outside; when its init exits the
     kernel kills everything left inside, grandchildren included),
   - when we run as root, a fresh unprivileged uid and gid per run (it owns
     nothing but the work dir, cannot signal our processes, and makes
     RLIMIT_NPROC count only this run's processes),
   - resource limits: CPU seconds, address space, processes, file size, open
     files, no core dumps; set by the harness in the child before the
     program runs, not in a preexec_fn, which is unsafe with the threads
     run_many uses,
   - its own session and process group, killed as a whole on timeout, plus a
     sweep of every process left with the run's uid.
   Where the OS refuses a namespace (an unprivileged container) we fall back
   silently to what it allows.
2. Interpreter: a harness in the child installs an audit hook (PEP 578; it
   cannot be removed) before the program runs. It blocks starting processes,
   signals, sockets, ctypes, writes and deletes outside the work dir, chdir,
   reading /proc, and the frame and gc introspection the program would need
   to reach the harness's secrets. This is defence in depth, not a barrier on
   its own: pure-Python guards have known bypasses.
3. Reporting: the harness sends results on a separate pipe, in a record that
   carries a random nonce it read from another pipe before the program ran.
   Nothing the program prints can forge a pass; a second record with the
   right nonce (a stolen one) makes the run an 'error', not a pass.

Status of a run:
  'passed'  the program ran and every test passed.
  'failed'  the program ran and at least one test failed.
  'timeout' the wall-clock limit was reached; the process group was killed.
  'crashed' the program is at fault: it raised at top level (SyntaxError and
            SystemExit included), was killed by a signal or a resource limit,
            exited before the tests finished, or overflowed stdout/stderr.
            All tests count as failed.
  'error'   the sandbox itself could not run the program (no interpreter,
            no temp dir), or a second valid result record appeared (a leaked
            nonce). Not the program's fault, or a sandbox weakness to look
            at, so callers can count it separately.

A syntax error in the program is 'crashed', not 'error': it is the model's
mistake like any other top-level exception, and 'error' is kept for faults of
the infrastructure.

The program runs as a module named `solution`, not `__main__`, so an
`if __name__ == "__main__":` block that reads stdin (which is empty) does not
fail every test for reasons unrelated to the function under test.

Usage:
  result = run_tests("def add(a, b):\n    return a + b",
                     ["assert add(1, 2) == 3", "assert add(0, 0) == 0"])
  result.status, result.pass_fraction  # ('passed', 1.0)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pwd
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Sequence

STATUSES = ("passed", "failed", "timeout", "crashed", "error")

# Limits that are not worth a parameter. Files are written only to the work
# dir, so 16 MiB is plenty for a test and keeps a disk-filling loop short.
_MAX_FILE_BYTES = 16 * 2**20
_MAX_OPEN_FILES = 64
# Linux counts threads under RLIMIT_NPROC, so a program that may start no
# processes still needs room for a few threads.
_THREAD_HEADROOM = 16
# The result pipe carries one short record; anything much larger is junk.
_MAX_RESULT_BYTES = 1 << 20
# Each per-test error message kept for logging, in characters.
_MAX_ERROR_CHARS = 300
# Per-run uids are drawn from this range: far above any uid in /etc/passwd,
# below 2**31 so every tool treats them as valid.
_UID_RANGE = (1_000_000, 2_000_000_000)


@dataclasses.dataclass(frozen=True)
class SandboxResult:
  """What happened when a program ran against its tests.

  Attributes:
    status: one of STATUSES; see the module docstring.
    passed: one bool per test, in the order given. All False unless the
      program ran to the end of the tests.
    pass_fraction: sum(passed) / len(passed).
    stdout: the program's stdout, decoded, at most max_output_bytes.
    stderr: the program's stderr, decoded, at most max_output_bytes.
    wall_s: seconds from starting the child to reaping it.
    reason: why the status is not 'passed'/'failed' (or why a program
      crashed), '' otherwise.
    errors: per test, '' if it passed, else "ExceptionType: message".
  """

  status: str
  passed: tuple[bool, ...]
  pass_fraction: float
  stdout: str
  stderr: str
  wall_s: float
  reason: str = ""
  errors: tuple[str, ...] = ()


# ---------------------------------------------------------------------------
# The harness: runs inside the child, before and around the untrusted code.
# ---------------------------------------------------------------------------

# Executed with `python -c`, in a private globals dict whose builtins are a
# snapshot, so the program cannot reach it through sys.modules['__main__']
# or change the builtins it calls. Every module function used after the
# program starts is bound to a local first: the program can monkeypatch
# modules, but not locals of a running frame (frame access is blocked).
# argv: nonce_fd result_fd input_path allow_procs nproc_budget cpu_s as_bytes
_HARNESS = r'''
def _main(argv):
  import os, sys, resource, types, builtins, gc
  read, write, close, fstat, unlink = os.read, os.write, os.close, os.fstat, os.unlink
  getuid, listdir, exit_now, fspath = os.getuid, os.listdir, os._exit, os.fspath
  set_inheritable = os.set_inheritable
  nonce_fd, result_fd = int(argv[1]), int(argv[2])
  input_path, allow_procs = argv[3], argv[4] == "1"
  nproc_budget, cpu_s, as_bytes = int(argv[5]), int(argv[6]), int(argv[7])
  file_bytes, open_files = int(argv[8]), int(argv[9])

  # The nonce never touches argv, env or disk, where the program could read it.
  nonce = b""
  while len(nonce) < 32:
    chunk = read(nonce_fd, 32 - len(nonce))
    if not chunk:
      break
    nonce += chunk
  close(nonce_fd)
  if len(nonce) != 32:
    exit_now(70)
  set_inheritable(result_fd, False)  # exec'd grandchildren don't get it
  getpid = os.getpid
  harness_pid = getpid()
  channel = fstat(result_fd)
  channel_id = (channel.st_dev, channel.st_ino)

  with open(input_path, "rb") as f:
    raw = f.read()
  unlink(input_path)  # the work dir is empty when the program starts
  sep = raw.index(b"\0")
  n_tests = int(raw[:sep])
  parts = raw[sep + 1:].split(b"\0")
  program_src = parts[0].decode("utf-8", "surrogateescape")
  tests = [t.decode("utf-8", "surrogateescape") for t in parts[1:1 + n_tests]]
  test_codes = [compile(t, "<test %d>" % i, "exec", dont_inherit=True)
                for i, t in enumerate(tests)]

  cwd = os.getcwd()
  roots = (cwd, os.path.realpath(cwd))

  # Count the tasks this uid already has, so RLIMIT_NPROC (which counts
  # processes and threads per real uid) allows exactly nproc_budget more.
  uid = getuid()
  tasks = 0
  for pid in listdir("/proc"):
    if not pid.isdigit():
      continue
    try:
      with open("/proc/%s/status" % pid) as f:
        status = f.read()
    except OSError:
      continue
    fields = {}
    for line in status.splitlines():
      k, _, v = line.partition(":")
      fields[k] = v.split()
    if fields.get("Uid", [""])[0] == str(uid):
      tasks += int(fields.get("Threads", ["1"])[0])
  R = resource
  for which, soft, hard in (
      (R.RLIMIT_CPU, cpu_s, cpu_s + 1),  # SIGXCPU at soft, SIGKILL at hard
      (R.RLIMIT_AS, as_bytes, as_bytes),
      (R.RLIMIT_NPROC, tasks + nproc_budget, tasks + nproc_budget),
      (R.RLIMIT_FSIZE, file_bytes, file_bytes),
      (R.RLIMIT_NOFILE, open_files, open_files),
      (R.RLIMIT_CORE, 0, 0)):
    R.setrlimit(which, (soft, hard))

  def normalize(p):
    # Lexical only: the program cannot create symlinks (blocked below), so
    # inside the work dir the lexical path is the real one.
    if not p.startswith("/"):
      p = cwd + "/" + p
    out = []
    for part in p.split("/"):
      if part == "" or part == ".":
        continue
      if part == "..":
        if out:
          out.pop()
      else:
        out.append(part)
    return "/" + "/".join(out)

  def as_text(p):
    if isinstance(p, bytes):
      return p.decode("utf-8", "surrogateescape")
    return p

  def inside(p):
    if type(p) is not str and type(p) is not bytes:
      return False  # a PathLike could answer differently the second time
    p = normalize(as_text(p))
    for r in roots:
      if p == r or p.startswith(r + "/"):
        return True
    return False

  def in_proc(p):
    if type(p) is int:
      return False
    try:
      p = normalize(as_text(fspath(p)))
    except BaseException:
      return True
    return p == "/proc" or p.startswith("/proc/") or p.startswith("/sys/")

  PROCESS_EVENTS = frozenset((
      "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
      "os.forkpty", "subprocess.Popen", "pty.spawn"))
  BLOCKED = frozenset((
      "os.kill", "os.killpg", "signal.pthread_kill", "os.chdir", "os.chroot",
      "os.symlink", "os.link",
      "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
      "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
      "socket.gethostbyaddr",
      "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
      "resource.setrlimit", "resource.prlimit",
      "sys.settrace", "sys.setprofile", "sys.addaudithook",
      # Frame and gc introspection: the only ways to the nonce in our frame.
      "sys._getframe", "sys._current_frames", "object.__getattr__",
      "gc.get_objects", "gc.get_referrers", "gc.get_referents"))
  # event: (argument positions that are paths, positions that are dir_fds)
  PATH_EVENTS = {
      "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)),
      "os.rename": ((0, 1), (2, 3)), "os.mkdir": ((0,), (2,)),
      "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
      "os.utime": ((0,), (3,)), "os.truncate": ((0,), ()),
      "os.mkfifo": ((0,), (2,)), "os.mknod": ((0,), (3,)),
      "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
      "shutil.rmtree": ((0,), (1,)), "shutil.copyfile": ((1,), ()),
      "shutil.copytree": ((1,), ()), "shutil.move": ((0, 1), ())}
  WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
  BLOCKED_IMPORTS = frozenset(("_ctypes",) + (() if allow_procs else ("_posixsubprocess",)))

  def deny(event):
    # PermissionError for the path events keeps well-behaved code readable;
    # ValueError is what stdlib callers of sys._getframe already tolerate.
    if event == "sys._getframe":
      return ValueError("sandbox: sys._getframe is disabled")
    return PermissionError("sandbox: %s is not allowed" % event)

  def hook(event, args):
    if event in BLOCKED or (not allow_procs and event in PROCESS_EVENTS):
      raise deny(event)
    if event == "open":
      path, mode, flags = args
      if type(path) is int:
        return
      if in_proc(path):
        raise deny("reading /proc")
      writing = (type(flags) is int and flags & WRITE_FLAGS) or (
          type(mode) is str and ("w" in mode or "a" in mode or "x" in mode or "+" in mode))
      if not writing:
        return
      if as_text(path) == "/dev/null":
        return
      # os.open (mode None) may carry a dir_fd the event does not show, so a
      # relative path could land anywhere: only absolute paths are checked.
      if mode is None and not (type(path) in (str, bytes) and as_text(path).startswith("/")):
        raise deny("os.open for writing with a relative path")
      if not inside(path):
        raise deny("writing outside the work dir")
      return
    if event in PATH_EVENTS:
      paths, dir_fds = PATH_EVENTS[event]
      for i in dir_fds:
        if i < len(args) and args[i] is not None and not (type(args[i]) is int and args[i] < 0):
          raise deny(event + " with dir_fd")
      for i in paths:
        if i < len(args) and type(args[i]) is not int and not inside(args[i]):
          raise deny(event + " outside the work dir")
      return
    if event == "import" and args[0] in BLOCKED_IMPORTS:
      raise deny("import " + args[0])

  module = types.ModuleType("solution")
  module.__dict__["__builtins__"] = builtins
  module.__file__ = cwd + "/solution.py"
  sys.modules["solution"] = module
  sys.modules["__main__"] = module
  ns = module.__dict__
  program_error = ""
  try:
    program_code = compile(program_src, "solution.py", "exec", dont_inherit=True)
  except BaseException as e:
    program_code = None
    program_error = "%s: %s" % (type(e).__name__, e)
  del program_src, raw, parts

  sys.addaudithook(hook)
  del hook

  def describe(e):
    # str() of a hostile exception can run its code; keep only a plain str.
    try:
      name = type(e).__name__
      msg = str(e)
      if type(msg) is not str or type(name) is not str:
        return "Exception"
      text = name + ": " + msg if msg else name
      return text[:300]
    except BaseException:
      return "Exception"

  passed = []
  errors = []
  if program_code is not None:
    try:
      exec(program_code, ns)
    except BaseException as e:
      program_error = describe(e)
  if not program_error:
    for code in test_codes:
      try:
        exec(code, ns)
        passed.append(True)
        errors.append("")
      except BaseException as e:
        passed.append(False)
        errors.append(describe(e))

  # A child the program forked returns through this code too; only the
  # process that started the program reports.
  if getpid() != harness_pid:
    exit_now(0)
  # The program may have swapped our pipe for one it reads (dup2), hoping to
  # learn the nonce: refuse to write to anything but the original.
  try:
    now = fstat(result_fd)
  except BaseException:
    exit_now(71)
  if (now.st_dev, now.st_ino) != channel_id:
    exit_now(71)
  hexs = lambda s: s.encode("utf-8", "replace").hex() or "-"
  record = b" ".join((
      nonce.hex().encode(),
      b"error" if program_error else b"ok",
      "".join("1" if p else "0" for p in passed).encode(),
      ",".join(hexs(e) for e in errors).encode(),
      hexs(program_error).encode()))
  data = b"\n" + record + b"\n"
  while data:
    try:
      n = write(result_fd, data)
    except BaseException:
      exit_now(72)
    data = data[n:]
  for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
    try:
      stream.flush()
    except BaseException:
      pass
  # Skip atexit handlers and the join of non-daemon threads the program left.
  exit_now(0)

import sys as _sys
_main(_sys.argv)
'''

# Exit codes of the harness when it cannot report. Only 70 happens before
# the program runs, so only it is the sandbox's fault ('error'); 71 and 72
# follow something the program did to the result pipe ('crashed'). A program
# can exit with these codes itself, which gains it nothing: no status scores.
_HARNESS_EXITS = {
    70: ("error", "harness could not read its nonce"),
    71: ("crashed", "the program tampered with the result channel"),
    72: ("crashed", "the result channel could not be written (closed by the program?)"),
}

_BOOTSTRAP = (
    "import builtins as b\n"
    "g = {'__builtins__': dict(b.__dict__), '__name__': '_sandbox_harness'}\n"
    "del b\n"
    "exec(%r, g)\n" % _HARNESS)


# ---------------------------------------------------------------------------
# Isolation: what this machine allows, probed once.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Isolation:
  namespace_prefix: tuple[str, ...]  # unshare ... -- ; () if none
  network_namespace: bool
  pid_namespace: bool
  user_namespace: bool
  drop_uid: bool  # run each sandbox as a fresh unprivileged uid
  interpreter: str
  nproc_enforced: bool


_isolation_lock = threading.Lock()
_isolation: _Isolation | None = None


def _quiet_run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess | None:
  try:
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=10, env=_base_env("/"), cwd="/", **kwargs)
  except (OSError, subprocess.SubprocessError):
    return None


def _probe() -> _Isolation:
  """Finds the strongest isolation this machine allows."""
  root = os.geteuid() == 0
  unshare = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
  prefix: tuple[str, ...] = ()
  user_ns = False
  if unshare:
    base = ("--net", "--pid", "--fork", "--kill-child", "--mount-proc")
    candidates = []
    if root:
      candidates.append(((unshare,) + base, False))
    # Unprivileged: a user namespace grants the rights to create the others.
    candidates.append(((unshare, "--user", "--map-root-user") + base, True))
    for cand, is_user in candidates:
      done = _quiet_run(list(cand) + ["--", "/bin/true"])
      if done is not None and done.returncode == 0:
        prefix, user_ns = cand, is_user
        break

  # The interpreter must be executable by the sandbox uid; a pyenv under
  # /root is not, so fall back to the system Python of the same version (the
  # harness and the program need only the standard library).
  want = "%d.%d" % sys.version_info[:2]
  interpreters = [sys.executable]
  for d in ("/usr/bin", "/bin", "/usr/local/bin"):
    interpreters.append(f"{d}/python{want}")
  check = ["-S", "-s", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]

  def works(interp: str, drop: bool) -> bool:
    if not os.path.exists(interp):
      return False
    cmd = list(prefix)
    kwargs = {}
    if drop:
      uid = _UID_RANGE[0] - 1  # a probe uid no run ever gets
      if prefix:
        cmd += ["--setuid", str(uid), "--setgid", str(uid)]
      else:
        kwargs = dict(user=uid, group=uid, extra_groups=[])
    if prefix:
      cmd.append("--")
    done = _quiet_run(cmd + [interp] + check, **kwargs)
    return done is not None and done.returncode == 0 and done.stdout.decode().strip() == want

  chosen, drop = None, False
  if root:
    chosen = next((i for i in interpreters if works(i, True)), None)
    drop = chosen is not None
  if chosen is None:
    chosen = next((i for i in interpreters if works(i, False)), sys.executable)
  return _Isolation(
      namespace_prefix=prefix,
      network_namespace=bool(prefix),
      pid_namespace=bool(prefix),
      user_namespace=user_ns,
      drop_uid=drop,
      interpreter=chosen,
      # RLIMIT_NPROC does not bind root; it binds a dropped uid or a uid
      # that was never root.
      nproc_enforced=drop or not root)


def _get_isolation() -> _Isolation:
  global _isolation
  with _isolation_lock:
    if _isolation is None:
      _isolation = _probe()
    return _isolation


def isolation_report() -> dict:
  """Which isolation layers the sandbox uses on this machine.

  Returns:
    A dict of bools (`network_namespace`, `pid_namespace`, `user_namespace`,
    `drop_uid`, `nproc_enforced`, `audit_hook`, `rlimits`) and the
    `interpreter` path the child runs.
  """
  iso = _get_isolation()
  return dict(
      network_namespace=iso.network_namespace,
      pid_namespace=iso.pid_namespace,
      user_namespace=iso.user_namespace,
      drop_uid=iso.drop_uid,
      nproc_enforced=iso.nproc_enforced,
      audit_hook=True,
      rlimits=True,
      interpreter=iso.interpreter,
  )


# ---------------------------------------------------------------------------
# Running one program.
# ---------------------------------------------------------------------------


def _base_env(home: str) -> dict[str, str]:
  # Nothing from our environment: API keys and tokens live there.
  return {
      "PATH": "/usr/bin:/bin",
      "LANG": "C.UTF-8",
      "PYTHONHASHSEED": "0",  # set iteration order must not make tests flaky
      "HOME": home,
      "TMPDIR": home,
  }


def _fresh_uid() -> int:
  while True:
    uid = secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0]) + _UID_RANGE[0]
    try:
      pwd.getpwuid(uid)
    except KeyError:
      return uid


def _kill_uid(uid: int) -> None:
  """SIGKILLs every process whose real uid is `uid` (the run's own uid)."""
  for _ in range(3):
    found = False
    for pid in os.listdir("/proc"):
      if not pid.isdigit():
        continue
      try:
        with open(f"/proc/{pid}/status") as f:
          for line in f:
            if line.startswith("Uid:"):
              if int(line.split()[1]) == uid:
                found = True
                os.kill(int(pid), signal.SIGKILL)
              break
      except (OSError, ValueError):
        continue
    if not found:
      return
    time.sleep(0.01)


def _rmtree(path: str) -> None:
  def retry(func, p, _):
    # The program may have left a directory without permissions.
    try:
      os.chmod(os.path.dirname(p), 0o700)
      os.chmod(p, 0o700)
      func(p)
    except OSError:
      pass
  shutil.rmtree(path, onerror=retry)


def _exited(pid: int) -> bool:
  # WNOWAIT: see the exit without reaping, so the pid (and with it the
  # process group id we are about to kill) cannot be reused meanwhile.
  try:
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
  except ChildProcessError:
    return True
  return info is not None


def _parse_record(buf: bytes, nonce_hex: bytes, n_tests: int):
  """Returns (record, problem): the harness's record, or why there is none."""
  records = []
  for line in buf.split(b"\n"):
    fields = line.split(b" ")
    if len(fields) == 5 and secrets.compare_digest(fields[0], nonce_hex):
      records.append(fields)
  if not records:
    return None, ""
  if len(records) > 1:
    return None, "more than one result record: the nonce leaked"
  _, kind, bits, errs, prog_err = records[0]

  def unhex(h: bytes) -> str:
    return "" if h == b"-" else bytes.fromhex(h.decode()).decode("utf-8", "replace")

  try:
    if kind == b"error":
      return ("error", (), (), unhex(prog_err)), ""
    passed = tuple(b == ord("1") for b in bits)
    errors = tuple(unhex(e) for e in errs.split(b","))
  except ValueError:
    return None, "malformed result record"
  if len(passed) != n_tests or len(errors) != n_tests:
    return None, "malformed result record"
  return ("ok", passed, errors, ""), ""


def _describe_exit(returncode: int, in_pid_ns: bool) -> str:
  # In a PID namespace /bin/sh is init and reports a signal as 128 + N.
  sig = -returncode if returncode < 0 else (
      returncode - 128 if in_pid_ns and returncode > 128 else 0)
  if sig:
    try:
      name = signal.Signals(sig).name
    except ValueError:
      name = f"signal {sig}"
    hint = {
        signal.SIGXCPU: " (CPU time limit)",
        signal.SIGXFSZ: " (file size limit)",
        signal.SIGKILL: " (killed: memory, CPU hard limit or an outside kill)",
        signal.SIGSEGV: " (segfault, often the stack or memory limit)",
    }.get(sig, "")
    return f"killed by {name}{hint} before reporting results"
  return f"exited with code {returncode} before reporting results"


def run_tests(
    program: str,
    tests: Sequence[str],
    *,
    timeout_s: float = 5.0,
    cpu_s: float | None = None,
    memory_mb: int = 512,
    max_procs: int | None = None,
    max_output_bytes: int = 64_000,
) -> SandboxResult:
  """Runs `program`, then each test statement, in a sandboxed child process.

  Args:
    program: Python source, e.g. a model's completion with the code extracted.
    tests: Python statements, each run after the program in its namespace,
      e.g. "assert add(1, 2) == 3". A test passes if it raises nothing.
    timeout_s: wall-clock limit for the whole run, interpreter start included.
    cpu_s: CPU-seconds limit (RLIMIT_CPU); None means ceil(timeout_s) + 1,
      so the wall clock normally decides.
    memory_mb: address-space limit (RLIMIT_AS) in MiB.
    max_procs: how many processes the program may start. None forbids
      processes altogether (the audit hook refuses them; RLIMIT_NPROC still
      leaves room for 16 threads). An integer allows that many processes or
      threads (Linux counts both) beyond the 16, but only where RLIMIT_NPROC
      binds (see isolation_report()['nproc_enforced']); elsewhere processes
      stay forbidden, since nothing would stop a fork bomb.
    max_output_bytes: cap on each of stdout and stderr; more kills the run
      ('crashed').

  Returns:
    A SandboxResult.

  Raises:
    ValueError: for invalid limits, no tests, or a test that is not valid
      Python (malformed task data, not the program's fault).
  """
  tests = list(tests)
  if not isinstance(program, str):
    raise ValueError(f"program must be a str, got {type(program).__name__}")
  if not tests:
    raise ValueError("tests is empty: a program with no tests cannot be scored")
  for i, t in enumerate(tests):
    if not isinstance(t, str):
      raise ValueError(f"tests[{i}] must be a str, got {type(t).__name__}")
    try:
      compile(t, f"<test {i}>", "exec", dont_inherit=True)
    except SyntaxError as e:
      raise ValueError(f"tests[{i}] is not valid Python ({e.msg}): {t!r}") from None
  if not timeout_s > 0:
    raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
  if cpu_s is not None and not cpu_s > 0:
    raise ValueError(f"cpu_s must be > 0 or None, got {cpu_s}")
  if memory_mb < 64:
    raise ValueError(f"memory_mb={memory_mb} is below what the interpreter needs (64)")
  if max_procs is not None and max_procs < 0:
    raise ValueError(f"max_procs must be >= 0 or None, got {max_procs}")
  if max_output_bytes < 0:
    raise ValueError(f"max_output_bytes must be >= 0, got {max_output_bytes}")

  iso = _get_isolation()
  allow_procs = max_procs is not None and iso.nproc_enforced
  nproc_budget = _THREAD_HEADROOM + (max_procs if allow_procs else 0)
  cpu_limit = int(cpu_s if cpu_s is not None else -(-timeout_s // 1) + 1)
  cpu_limit = max(cpu_limit, 1)

  def error(reason: str, wall_s: float = 0.0) -> SandboxResult:
    n = len(tests)
    return SandboxResult("error", (False,) * n, 0.0, "", "", wall_s, reason, ("",) * n)

  try:
    workdir = tempfile.mkdtemp(prefix="sandbox-")
  except OSError as e:
    return error(f"could not create a work dir: {e}")
  uid = _fresh_uid() if iso.drop_uid else None
  try:
    return _run_in(workdir, uid, iso, program, tests, timeout_s, cpu_limit,
                   memory_mb, allow_procs, nproc_budget, max_output_bytes, error)
  finally:
    if uid is not None:
      _kill_uid(uid)
    _rmtree(workdir)


def _run_in(workdir, uid, iso, program, tests, timeout_s, cpu_limit, memory_mb,
            allow_procs, nproc_budget, max_output_bytes, error) -> SandboxResult:
  """Starts the child in `workdir`, collects its output and result record."""
  input_path = os.path.join(workdir, ".sandbox_input")
  with open(input_path, "wb") as f:
    f.write(str(len(tests)).encode() + b"\0")
    f.write(b"\0".join(s.encode("utf-8", "surrogateescape") for s in [program] + tests))
  if uid is not None:
    os.chown(workdir, uid, uid)
    os.chown(input_path, uid, uid)

  nonce = secrets.token_bytes(32)
  nonce_r, nonce_w = os.pipe()
  result_r, result_w = os.pipe()
  cmd = list(iso.namespace_prefix)
  kwargs = {}
  if uid is not None:
    if cmd:
      cmd += ["--setuid", str(uid), "--setgid", str(uid)]
    else:
      kwargs = dict(user=uid, group=uid, extra_groups=[])
  if cmd:
    # sh, not Python, is init of the PID namespace: init ignores signals it
    # has no handler for, which would disarm SIGXCPU and friends.
    cmd += ["--", "/bin/sh", "-c", '"$@"; exit $?', "sh"]
  cmd += [iso.interpreter,
          "-S", "-s", "-B",  # no site-packages, no user site, no .pyc writes
          "-P",  # do not put the work dir on sys.path
          "-c", _BOOTSTRAP,
          str(nonce_r), str(result_w), input_path, "1" if allow_procs else "0",
          str(nproc_budget), str(cpu_limit), str(memory_mb * 2**20),
          str(_MAX_FILE_BYTES), str(_MAX_OPEN_FILES)]

  start = time.monotonic()
  try:
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=workdir, env=_base_env(workdir), close_fds=True,
        pass_fds=(nonce_r, result_w), start_new_session=True, **kwargs)
  except OSError as e:
    for fd in (nonce_r, nonce_w, result_r, result_w):
      os.close(fd)
    return error(f"could not start the interpreter {iso.interpreter}: {e}")
  os.close(nonce_r)
  os.close(result_w)
  try:
    os.write(nonce_w, nonce)  # 32 bytes fit any pipe buffer: never blocks
  except OSError:
    pass  # the child already died; its exit status will say why
  os.close(nonce_w)

  deadline = start + timeout_s
  bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(),
          result_r: bytearray()}
  caps = {proc.stdout.fileno(): max_output_bytes, proc.stderr.fileno(): max_output_bytes,
          result_r: _MAX_RESULT_BYTES}
  names = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
  sel = selectors.DefaultSelector()
  for fd in bufs:
    os.set_blocking(fd, False)
    sel.register(fd, selectors.EVENT_READ)
  timed_out, overflow, exited_at = False, "", None
  try:
    while sel.get_map():
      now = time.monotonic()
      if now >= deadline:
        timed_out = True
        break
      if exited_at is None and _exited(proc.pid):
        exited_at = now
      # After the child exits, a grandchild may still hold a pipe open;
      # drain briefly, then stop waiting for an EOF that may never come.
      if exited_at is not None and now - exited_at > 0.2:
        break
      for key, _ in sel.select(timeout=min(0.05, deadline - now)):
        fd = key.fd
        try:
          chunk = os.read(fd, 65536)
        except BlockingIOError:
          continue
        if not chunk:
          sel.unregister(fd)
          continue
        room = caps[fd] - len(bufs[fd])
        bufs[fd] += chunk[:max(room, 0)]
        if len(chunk) > room:
          if fd == result_r:
            sel.unregister(fd)  # junk on the result pipe: stop reading it
          else:
            overflow = f"{names[fd]} exceeded {max_output_bytes} bytes"
            break
      if overflow:
        break
  finally:
    sel.close()
    # Kill the whole group whatever happened: it is how leftovers die when
    # there is no PID namespace. The child is not reaped yet, so the group
    # id cannot have been reused.
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass
    proc.wait()
    wall_s = time.monotonic() - start
    for f in (proc.stdout, proc.stderr):
      f.close()
    os.close(result_r)

  out_fd, err_fd = names  # stdout, stderr
  stdout = bytes(bufs[out_fd]).decode("utf-8", "replace")
  stderr = bytes(bufs[err_fd]).decode("utf-8", "replace")
  n = len(tests)
  fail = (False,) * n

  def result(status, passed=fail, reason="", errors=("",) * n):
    frac = sum(passed) / n
    return SandboxResult(status, tuple(passed), frac, stdout, stderr, wall_s, reason, tuple(errors))

  if overflow:
    return result("crashed", reason=overflow)
  record, problem = _parse_record(bytes(bufs[result_r]), nonce.hex().encode(), n)
  if problem:
    return result("error", reason=problem)
  if record is not None:
    kind, passed, errors, prog_err = record
    if kind == "error":
      return result("crashed", reason=f"program raised {prog_err}")
    return result("passed" if all(passed) else "failed", passed, "", errors)
  if timed_out:
    return result("timeout", reason=f"wall-clock limit of {timeout_s:g} s")
  if proc.returncode in _HARNESS_EXITS:
    status, reason = _HARNESS_EXITS[proc.returncode]
    return result(status, reason=reason)
  return result("crashed", reason=_describe_exit(proc.returncode, iso.pid_namespace))


def run_many(
    jobs: Sequence[tuple[str, Sequence[str]]],
    max_workers: int = 2,
    **limits,
) -> list[SandboxResult]:
  """Runs several (program, tests) pairs concurrently, results in job order.

  Args:
    jobs: (program, tests) pairs, as for run_tests.
    max_workers: how many sandboxes run at once. Each is one process busy for
      up to timeout_s, so this bounds the CPU the sandboxes take.
    **limits: keyword limits passed to every run_tests call.

  Returns:
    One SandboxResult per job, in the order of `jobs`.
  """
  if max_workers < 1:
    raise ValueError(f"max_workers must be >= 1, got {max_workers}")
  _get_isolation()  # probe once, not once per thread
  with concurrent.futures.ThreadPoolExecutor(max_workers=max_workers) as pool:
    futures = [pool.submit(run_tests, program, tests, **limits) for program, tests in jobs]
    return [f.result() for f in futures]
