"""The code sandbox: ordinary runs, and hostile programs that must stay contained.

Every hostile case runs twice: with whatever OS isolation this machine allows
('os'), and with the OS layers switched off so that only the rlimits and the
in-child audit hook stand between the program and us ('guard_only'). Either
layer on its own must contain every case.

Each program first prints its work dir, so a test can find any process that
is still running in it afterwards (a leftover) by its cwd.
"""

import dataclasses
import os
import socket
import sys
import time

import pytest

from pipeline import sandbox

_SECRET = "sandbox-test-secret-7f3a9c"
_PRELUDE = "import os as _os\nprint(_os.getcwd(), flush=True)\n"

# Outcomes of the parametrized hostile cases, checked by the last test.
_OUTCOMES: dict[str, str] = {}


def _processes_in(workdir: str) -> list[int]:
  """Pids of processes whose cwd is (or was, before deletion) `workdir`."""
  found = []
  for pid in os.listdir("/proc"):
    if not pid.isdigit():
      continue
    try:
      cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
      continue
    if cwd == workdir or cwd.startswith(workdir + " ") or cwd.startswith(workdir + "/"):
      found.append(int(pid))
  return found


def _zombie_children() -> list[int]:
  zombies = []
  for pid in os.listdir("/proc"):
    if not pid.isdigit():
      continue
    try:
      with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    except OSError:
      continue
    # Fields after the parenthesised command: state, ppid, ...
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]
    if int(ppid) == os.getpid() and state == "Z":
      zombies.append(int(pid))
  return zombies


@pytest.fixture(params=["os", "guard_only"])
def mode(request, monkeypatch):
  if request.param == "guard_only":
    iso = sandbox._get_isolation()
    weak = dataclasses.replace(
        iso, namespace_prefix=(), network_namespace=False, pid_namespace=False,
        user_namespace=False, drop_uid=False, interpreter=sys.executable,
        nproc_enforced=os.geteuid() != 0)
    monkeypatch.setattr(sandbox, "_isolation", weak)
  return request.param


@pytest.fixture
def listener():
  sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  sock.bind(("127.0.0.1", 0))
  sock.listen(8)
  yield sock
  sock.close()


# ---------------------------------------------------------------------------
# Ordinary runs.
# ---------------------------------------------------------------------------


def test_correct_program_passes():
  r = sandbox.run_tests("def add(a, b):\n  return a + b\n",
                        ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], timeout_s=5)
  assert r.status == "passed", r
  assert r.passed == (True, True)
  assert r.pass_fraction == 1.0
  assert r.errors == ("", "")
  assert r.reason == ""


def test_wrong_program_fails_per_test():
  r = sandbox.run_tests(
      "def add(a, b):\n  return a - b\n",
      ["assert add(2, 0) == 2", "assert add(1, 2) == 3, 'off'", "add(1)", "assert add(0, 0) == 0"],
      timeout_s=5)
  assert r.status == "failed", r
  assert r.passed == (True, False, False, True)
  assert r.pass_fraction == 0.5
  assert r.errors[1] == "AssertionError: off"
  assert r.errors[2].startswith("TypeError")


def test_syntax_error_is_crashed():
  r = sandbox.run_tests("def add(a, b)\n  return a + b\n", ["assert add(1, 2) == 3"])
  assert r.status == "crashed"
  assert r.passed == (False,)
  assert "SyntaxError" in r.reason


def test_top_level_exception_is_crashed_and_fails_all():
  r = sandbox.run_tests("def f():\n  return 1\nraise RuntimeError('nope')\n",
                        ["assert f() == 1", "assert True"])
  assert r.status == "crashed"
  assert r.passed == (False, False)
  assert "RuntimeError: nope" in r.reason


def test_output_and_stdin_and_main_guard():
  # stdin is empty and the module is not __main__, so a main() that reads
  # input does not run; stdout and stderr come back decoded.
  program = ("import sys\nprint('héllo')\nprint('warn', file=sys.stderr)\n"
             "def f():\n  return 2\n"
             "if __name__ == '__main__':\n  input()\n")
  r = sandbox.run_tests(program, ["assert f() == 2", "assert __name__ == 'solution'"])
  assert r.status == "passed", r
  assert r.stdout == "héllo\n"
  assert r.stderr == "warn\n"


def test_program_may_use_its_work_dir_and_threads():
  program = ("import threading, tempfile\n"
             "with open('data.txt', 'w') as f:\n  f.write('42')\n"
             "with tempfile.TemporaryFile() as t:\n  t.write(b'x')\n"
             "out = []\n"
             "ts = [threading.Thread(target=out.append, args=(i,)) for i in range(4)]\n"
             "[t.start() for t in ts]; [t.join() for t in ts]\n")
  r = sandbox.run_tests(program, ["assert open('data.txt').read() == '42'",
                                  "assert sorted(out) == [0, 1, 2, 3]"])
  assert r.status == "passed", r


def test_work_dir_is_removed():
  r = sandbox.run_tests(_PRELUDE + "open('f', 'w').write('x')\n", ["assert True"])
  workdir = r.stdout.splitlines()[0]
  assert workdir.startswith("/")
  assert not os.path.exists(workdir)


def test_invalid_arguments_raise():
  with pytest.raises(ValueError, match="tests is empty"):
    sandbox.run_tests("x = 1", [])
  with pytest.raises(ValueError, match=r"tests\[1\] is not valid Python"):
    sandbox.run_tests("x = 1", ["assert x == 1", "assert ("])
  with pytest.raises(ValueError, match="timeout_s"):
    sandbox.run_tests("x = 1", ["assert x"], timeout_s=0)
  with pytest.raises(ValueError, match="memory_mb"):
    sandbox.run_tests("x = 1", ["assert x"], memory_mb=1)


def test_run_many_preserves_order():
  jobs = [("def f():\n  return 1\n", ["assert f() == 1"]),
          ("while True:\n  pass\n", ["assert True"]),
          ("def f():\n  return 2\n", ["assert f() == 1", "assert f() == 2"]),
          ("raise ValueError('x')\n", ["assert True"])]
  start = time.monotonic()
  results = sandbox.run_many(jobs, max_workers=2, timeout_s=1.5)
  assert [r.status for r in results] == ["passed", "timeout", "failed", "crashed"]
  assert results[2].passed == (False, True)
  assert time.monotonic() - start < 1.5 + 3


def test_isolation_report():
  report = sandbox.isolation_report()
  for key in ("network_namespace", "pid_namespace", "user_namespace", "drop_uid",
              "nproc_enforced", "audit_hook", "rlimits"):
    assert isinstance(report[key], bool), key
  assert os.access(report["interpreter"], os.X_OK)


def test_cpu_limit_kills():
  r = sandbox.run_tests("while True:\n  pass\n", ["assert True"], timeout_s=6, cpu_s=1)
  assert r.status == "crashed", r
  assert "SIGXCPU" in r.reason or "SIGKILL" in r.reason
  assert r.wall_s < 4


# ---------------------------------------------------------------------------
# Hostile programs. Each case: (program, tests, run_tests kwargs, statuses
# allowed, check) where check(result, ctx) asserts the harm did not happen.
# ctx holds tmp_path, the listener's port and the sentinel file.
# ---------------------------------------------------------------------------


def _no_pass(r, ctx):
  assert not any(r.passed), r


def _contained_timeout(r, ctx):
  assert r.wall_s < 2 + 2, r.wall_s


def _outside_absent(r, ctx):
  assert not (ctx["tmp"] / "pwned").exists()
  assert not os.path.exists(ctx["tmp_global"])


def _sentinel_survives(r, ctx):
  assert ctx["sentinel"].read_text() == "keep"


def _no_secret(r, ctx):
  assert _SECRET not in r.stdout + r.stderr


def _no_connection(r, ctx):
  ctx["listener"].settimeout(0.3)
  with pytest.raises(socket.timeout):
    conn, _ = ctx["listener"].accept()
    conn.close()


def _output_capped(r, ctx):
  assert "exceeded" in r.reason
  assert len(r.stdout.encode()) <= 64_000
  assert r.wall_s < 5


_FORGE = """
import os, sys, gc
found = []
def grab(fn):
  try:
    found.extend(fn())
  except BaseException as e:
    print('blocked:', type(e).__name__, e)
def frames():
  f = sys._getframe(1)
  out = []
  while f is not None:
    out += [v for v in f.f_locals.values() if isinstance(v, bytes) and len(v) == 32]
    f = f.f_back
  return out
def tb_frames():
  try:
    1 / 0
  except ZeroDivisionError as e:
    f = e.__traceback__.tb_frame
  out = []
  while f is not None:
    out += [v for v in f.f_locals.values() if isinstance(v, bytes) and len(v) == 32]
    f = f.f_back
  return out
def gc_scan():
  return [o for o in gc.get_objects() if isinstance(o, bytes) and len(o) == 32]
def proc_mem():
  return [open('/proc/self/cmdline', 'rb').read()[:32]]
for fn in (frames, tb_frames, gc_scan, proc_mem):
  grab(fn)
guesses = [n.hex().encode() for n in found] + [b'0' * 64]
for nonce in guesses:
  record = b'\\n' + nonce + b' ok 1 - -\\n'
  sys.stdout.buffer.write(record)
  for fd in range(3, 64):
    try:
      os.write(fd, record)
    except OSError:
      pass
sys.stdout.flush()
"""

_OVERRIDE_BUILTINS = """
import builtins, os, sys
class Fake(Exception):
  pass
builtins.AssertionError = Fake
builtins.BaseException = Fake
builtins.Exception = Fake
builtins.exec = lambda *a, **k: None
builtins.compile = lambda *a, **k: None
builtins.isinstance = lambda *a: True
builtins.str = lambda *a: 'ok'
os.write = lambda fd, data: len(data)
os._exit = lambda code: None
os.fstat = lambda fd: None
sys.modules['os'] = None
__builtins__ = {{}}
"""

_HOSTILE = {
    "infinite_loop": ("while True:\n  pass\n", ["assert True"], dict(timeout_s=2),
                      {"timeout"}, _contained_timeout),
    "sleep_past_limit": ("import time\ntime.sleep(100)\n", ["assert True"], dict(timeout_s=2),
                         {"timeout"}, _contained_timeout),
    "fork_bomb": ("while True:\n  _os.fork()\n", ["assert True"], dict(timeout_s=2),
                  {"crashed"}, _no_pass),
    "fork_bomb_procs_allowed": ("while True:\n  _os.fork()\n", ["assert True"],
                                dict(timeout_s=2, max_procs=8), {"crashed"}, _no_pass),
    "grandchild_sleep": (
        "import subprocess\n"
        "subprocess.Popen(['sleep', '4242'], start_new_session=True)\n"
        "def f():\n  return 1\n",
        ["assert f() == 1"], dict(timeout_s=2, max_procs=8), {"passed", "crashed"}, None),
    "grandchild_double_fork": (
        "if _os.fork() == 0:\n  _os.setsid()\n  import time\n  time.sleep(4242)\n",
        ["assert True"], dict(timeout_s=2, max_procs=8), {"passed", "crashed"}, None),
    "grandchild_holds_stdout": (
        "import subprocess\nsubprocess.Popen(['sleep', '4242'])\n",
        ["assert True"], dict(timeout_s=2, max_procs=8), {"passed", "crashed"},
        lambda r, ctx: _contained_timeout(r, ctx)),
    "memory_bomb_string": ("x = 'a' * 10**10\n", ["assert True"], dict(timeout_s=3),
                           {"crashed"}, _no_pass),
    "memory_bomb_list": ("x = []\nwhile True:\n  x.append(bytearray(10**6))\n", ["assert True"],
                         dict(timeout_s=4, memory_mb=256), {"crashed"}, _no_pass),
    "huge_output": ("print('x' * 10**8)\n", ["assert True"], dict(timeout_s=4),
                    {"crashed"}, _output_capped),
    "endless_output": ("while True:\n  print('y' * 1000)\n", ["assert True"], dict(timeout_s=4),
                       {"crashed"}, _output_capped),
    "file_size_bomb": ("with open('big', 'wb') as f:\n  while True:\n    f.write(b'z' * 2**20)\n",
                       ["assert True"], dict(timeout_s=4), {"crashed"}, _no_pass),
    "write_outside": (
        "for p in ({tmp!r} + '/pwned', {tmp_global!r}):\n"
        "  try:\n    open(p, 'w').write('x')\n"
        "  except OSError as e:\n    print(e)\n"
        "  try:\n    _os.close(_os.open(p, _os.O_WRONLY | _os.O_CREAT))\n"
        "  except OSError as e:\n    print(e)\n"
        "d = _os.open({tmp!r}, _os.O_RDONLY)\n"
        "_os.open('pwned', _os.O_WRONLY | _os.O_CREAT, dir_fd=d)\n",
        ["assert True"], {}, {"crashed", "passed"}, _outside_absent),
    "write_via_symlink_or_chdir": (
        "try:\n  _os.symlink({tmp!r}, 'link')\n  open('link/pwned', 'w').write('x')\n"
        "except OSError as e:\n  print(e)\n"
        "_os.chdir({tmp!r})\nopen('pwned', 'w').write('x')\n",
        ["assert True"], {}, {"crashed"}, _outside_absent),
    "delete_outside": (
        "import shutil\n"
        "for f in (lambda: _os.remove({sentinel!r}), lambda: _os.rename({sentinel!r}, 'stolen'),\n"
        "          lambda: open({sentinel!r}, 'w'), lambda: shutil.rmtree({tmp!r})):\n"
        "  try:\n    f()\n  except OSError as e:\n    print(e)\n",
        ["assert True"], {}, {"passed", "crashed"}, _sentinel_survives),
    "read_parent_env": (
        "print(dict(_os.environ))\n"
        "for pid in ['self', str(_os.getppid()), {pytest_pid!r}, '1']:\n"
        "  try:\n    print(open('/proc/%s/environ' % pid, 'rb').read())\n"
        "  except OSError as e:\n    print(e)\n",
        ["assert True"], {}, {"passed", "crashed"}, _no_secret),
    "kill_parent": (
        "import signal\n"
        "for pid in (_os.getppid(), {pytest_pid}):\n"
        "  for kill in (lambda: _os.kill(pid, 9), lambda: _os.killpg(_os.getpgid(pid), 9)):\n"
        "    try:\n      kill()\n    except OSError as e:\n      print(e)\n"
        "_os.kill(0, 9)\n",
        ["assert True"], {}, {"crashed"}, None),
    "network_connect": (
        "import socket\n"
        "try:\n  socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        "except OSError as e:\n  print(e)\n"
        "import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
        ["assert True"], dict(timeout_s=3), {"crashed"}, _no_connection),
    "ctypes_and_raw_fork_exec": (
        "try:\n  import ctypes\n  ctypes.CDLL(None).system(b'sleep 4242')\n"
        "except BaseException as e:\n  print(e)\n"
        "import _posixsubprocess\n",
        ["assert True"], dict(timeout_s=2), {"crashed"}, None),
    "forge_result_record": (_FORGE, ["assert False"], dict(timeout_s=3),
                            {"failed", "crashed"}, _no_pass),
    "swap_result_pipe": (
        "r, w = _os.pipe()\n"
        "for fd in range(3, 32):\n"
        "  if fd not in (r, w):\n"
        "    try:\n      _os.dup2(w, fd)\n    except OSError:\n      pass\n",
        ["assert True"], {}, {"crashed"}, _no_pass),
    "exit_before_tests": ("import sys\nsys.exit(0)\n", ["assert True"], {},
                          {"crashed"}, _no_pass),
    "os_exit_before_tests": ("_os._exit(0)\n", ["assert True"], {}, {"crashed"}, _no_pass),
    "override_builtins": (_OVERRIDE_BUILTINS, ["assert False", "assert 1 == 2"], {},
                          {"failed", "crashed"}, _no_pass),
    "settrace_skips_asserts": (
        "import sys, threading\n"
        "def skip(frame, event, arg):\n  frame.f_lineno = frame.f_lineno + 1\n  return skip\n"
        "sys.settrace(skip)\n",
        ["assert False"], {}, {"crashed", "failed"}, _no_pass),
}


@pytest.mark.parametrize("case", sorted(_HOSTILE))
def test_hostile_program_is_contained(case, mode, tmp_path, listener):
  program, tests, kwargs, statuses, check = _HOSTILE[case]
  sentinel = tmp_path / "sentinel"
  sentinel.write_text("keep")
  tmp_global = f"/tmp/sandbox-escape-{os.getpid()}-{case}"
  ctx = dict(tmp=tmp_path, tmp_global=tmp_global, sentinel=sentinel, listener=listener)
  program = _PRELUDE + program.format(
      tmp=str(tmp_path), tmp_global=tmp_global, sentinel=str(sentinel),
      port=listener.getsockname()[1], pytest_pid=os.getpid())
  key = f"{case}[{mode}]"
  _OUTCOMES[key] = "escaped"  # until proven otherwise

  os.environ[_SECRET] = _SECRET  # must not reach the child
  try:
    r = sandbox.run_tests(program, tests, **kwargs)
  finally:
    del os.environ[_SECRET]

  assert r.status in statuses, r
  if check is not None:
    check(r, ctx)
  _no_secret(r, ctx)
  # The work dir (first line of stdout) has no process left in it, and we
  # have no unreaped child.
  workdir = r.stdout.splitlines()[0] if r.stdout else None
  if workdir:
    deadline = time.monotonic() + 1.0
    while _processes_in(workdir) and time.monotonic() < deadline:
      time.sleep(0.02)
    assert _processes_in(workdir) == [], f"leftover processes in {workdir}"
  assert _zombie_children() == []
  assert r.status != "passed" or all(r.passed)
  _OUTCOMES[key] = r.status


def test_no_hostile_case_escaped():
  expected = {f"{c}[{m}]" for c in _HOSTILE for m in ("os", "guard_only")}
  if set(_OUTCOMES) != expected:
    pytest.skip("runs only after the whole hostile suite")
  escaped = sorted(k for k, v in _OUTCOMES.items() if v == "escaped")
  assert escaped == [], f"{len(escaped)} of {len(expected)} hostile cases escaped: {escaped}"
