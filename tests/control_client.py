# One command on a snapshot filter's control socket, for the shell tests:
#   python3 control_client.py SOCKET WORD...
# Prints the reply; exits 0 on OK, 1 on ERR.
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(60); s.connect(sys.argv[1])
s.sendall((" ".join(sys.argv[2:]) + "\n").encode())
buf = b""
while True:
    c = s.recv(65536)
    if not c: sys.exit("ctl: connection closed before OK/ERR: %r" % buf)
    buf += c
    done = [l for l in buf.split(b"\n")[:-1] if l == b"OK" or l.startswith(b"ERR")]
    if done: break
sys.stdout.write(buf.decode(errors="replace"))
sys.exit(0 if done[0] == b"OK" else 1)
