"""Warm launches for the tests: ``python main.py`` without paying for ``import torch`` every time.

A test run launches main.py (and torchrun with its workers) a few hundred times; each fresh interpreter spends
3 to 5 seconds importing torch, torchvision and timm before it does anything. Here one *server* per test worker
imports them once, never runs anything else, and forks a child for each launch. A *client* (a stdlib-only
interpreter that starts in milliseconds) stands where the launched process would stand:

    python tests/warm.py run SOCKET main.py ARGS...       # behaves like: python main.py ARGS...
    python tests/warm.py run SOCKET -m MODULE ARGS...     # behaves like: python -m MODULE ARGS...

The forked child gets the client's argv, environment, working directory and standard streams (the file
descriptors themselves, passed over the socket), runs the script as ``__main__``, and exits as an interpreter
would (non-daemon threads joined, atexit handlers run). The client forwards the signals it receives to the child
and exits with the child's status (by the same signal, when the child died of one); if the client is killed, the
child kills itself. So a caller (a test, or torchrun watching its workers) sees what it would see with a fresh
interpreter, minus the import time. What differs: the process tree (the child is the server's child, so signals
sent to the client's process group reach the child only through the client). Tests that signal process groups
or read /proc for workers therefore launch cold interpreters (tests/cli.py says which helpers are warm).
"""
from __future__ import annotations

import atexit
import json
import os
import runpy
import select
import signal
import socket
import struct
import sys
import threading
import traceback

# Imported once by the server: what main.py and torchrun import anyway.
# (Not torch.distributed.run itself: ``-m`` runs a fresh copy, and runpy warns when the module is already loaded.)
PRELOAD = ('torch', 'torchvision', 'timm', 'numpy', 'PIL.Image', 'yacs.config', 'termcolor',
           'torch.distributed.launcher.api', 'torch.utils.tensorboard', 'launch', 'classification', 'trainer',
           'engine', 'config')
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT,
             signal.SIGCONT)


def _send(sock: socket.socket, message: dict, fds: tuple = ()) -> None:
    data = json.dumps(message).encode()
    payload = struct.pack('!I', len(data)) + data
    if fds:
        socket.send_fds(sock, [payload], list(fds))
    else:
        sock.sendall(payload)


def _receive(sock: socket.socket, with_fds: bool = False):
    """One message (and the file descriptors sent with it), or None when the peer has gone."""
    fds: list = []
    if with_fds:
        head, fds, _, _ = socket.recv_fds(sock, 4, 8)
    else:
        head = sock.recv(4, socket.MSG_WAITALL)
    if len(head) < 4:
        return (None, fds) if with_fds else None
    size, = struct.unpack('!I', head)
    body = b''
    while len(body) < size:
        chunk = sock.recv(size - len(body))
        if not chunk:
            return (None, fds) if with_fds else None
        body += chunk
    message = json.loads(body)
    return (message, fds) if with_fds else message


# -- the client --------------------------------------------------------------------------------------------------
def child_file(socket_path: str, client_pid: int) -> str:
    """Where a stand-in notes the pid of the run it stands for."""
    return os.path.join(os.path.dirname(socket_path), f'{client_pid}.child')


def client(socket_path: str, argv: list[str]) -> None:
    """Stand in for ``python ARGV``: ask the server for a child, forward signals, exit as the child did."""
    child, early = None, []  # signals that arrive before the child's pid is known wait in `early`
    # Started as a job of its own (a session leader, as a scheduler starts a job step): a signal to this stand-in
    # stands for one to the whole job, so it goes to the child's process group (the run and its loader workers).
    job = os.getsid(0) == os.getpid()
    send = os.killpg if job else os.kill

    def forward(sig, _frame):
        send(child, sig) if child is not None else early.append(sig)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path)
    _send(sock, dict(argv=argv, env=dict(os.environ), cwd=os.getcwd(), client=os.getpid(), job=job), fds=(0, 1, 2))
    reply = _receive(sock)
    if reply is None:
        sys.exit('warm launch: the server went away')
    child = reply['pid']
    with open(child_file(socket_path, os.getpid()), 'w') as f:  # who stands behind this stand-in (tests/cli.py)
        f.write(str(child))
    for sig in early:
        send(child, sig)
    status = None
    while status is None:
        try:
            status = _receive(sock)
        except InterruptedError:
            continue
        if status is None:
            sys.exit('warm launch: the server went away')
    if 'signal' in status:
        signal.signal(status['signal'], signal.SIG_DFL)
        os.kill(os.getpid(), status['signal'])
    os._exit(status['code'])


# -- the server --------------------------------------------------------------------------------------------------
def serve(socket_path: str) -> None:
    """Import once, then fork one child per request until the parent (the test worker) goes away."""
    parent = os.getppid()
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, not tests/
    for name in PRELOAD:
        __import__(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path + '.tmp')
    listener.listen(64)
    os.rename(socket_path + '.tmp', socket_path)  # the path appears when the server accepts
    while os.getppid() == parent:
        if not select.select([listener], [], [], 1.0)[0]:
            continue
        conn, _ = listener.accept()
        request, fds = _receive(conn, with_fds=True)
        if request is None:
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:
            listener.close()
            _child(request, fds, conn)
        for fd in fds:
            os.close(fd)
        _send(conn, dict(pid=pid))
        threading.Thread(target=_report, args=(conn, pid), daemon=True).start()


def _report(conn: socket.socket, pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    message = dict(signal=os.WTERMSIG(status)) if os.WIFSIGNALED(status) else dict(code=os.waitstatus_to_exitcode(status))
    try:
        _send(conn, message)
    except OSError:
        pass  # the client has gone
    conn.close()


def _child(request: dict, fds: list, conn: socket.socket) -> None:
    """Become ``python ARGV`` as the client would have run it; never returns."""
    code = 1
    try:
        _become(request, fds, conn)
        code = _run(request['argv'])
    finally:
        os._exit(code)


def _become(request: dict, fds: list, conn: socket.socket) -> None:
    conn.close()
    os.setsid()  # out of the server's group: a signal meant for the server is not meant for a launch
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    for fd in fds:
        os.close(fd)
    sys.stdin = open(0, 'r', closefd=False)
    sys.stdout = open(1, 'w', closefd=False, buffering=1)
    sys.stderr = open(2, 'w', closefd=False, buffering=1)
    os.chdir(request['cwd'])
    os.environ.clear()
    os.environ.update(request['env'])
    for sig in FORWARDED:
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import torch
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS') or os.cpu_count() or 1))
    threading.Thread(target=_die_with, args=(request['client'], request.get('job', False)), daemon=True).start()


def _die_with(client_pid: int, job: bool) -> None:
    """A killed client (kill -9 of a 'worker') takes its child with it, as killing the process itself would; a
    killed job (the client led its own session) takes the child's whole group."""
    try:
        select.select([os.pidfd_open(client_pid)], [], [])
    except OSError:
        pass
    os.killpg(0, signal.SIGKILL) if job else os.kill(os.getpid(), signal.SIGKILL)


def _run(argv: list[str]) -> int:
    """Run a script or ``-m module`` as ``__main__`` and end as the interpreter ends: join the non-daemon
    threads, run the atexit handlers; the exit code of SystemExit, 1 after an uncaught exception."""
    try:
        if argv[0] == '-m':
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name='__main__', alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name='__main__')
        code = 0
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()  # what the interpreter does before atexit: wait for non-daemon threads
        atexit._run_exitfuncs()
        _end_children()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    return code


def _end_children() -> None:
    """Processes the run started and left behind (loader workers it did not join): at an interpreter's exit its
    finalizers end them; this child leaves through os._exit, which runs none, so they are ended here."""
    for task in os.listdir('/proc/self/task'):
        try:
            children = open(f'/proc/self/task/{task}/children').read().split()
        except OSError:
            continue
        for pid in children:
            try:
                os.kill(int(pid), signal.SIGKILL)
                os.waitpid(int(pid), 0)
            except (OSError, ChildProcessError):
                pass


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


if __name__ == '__main__':
    if sys.argv[1] == 'serve':
        serve(sys.argv[2])
    elif sys.argv[1] == 'run':
        client(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(f'usage: {sys.argv[0]} serve SOCKET | run SOCKET SCRIPT|-m MODULE ARGS...')
