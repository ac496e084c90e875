// Drives the real socket.io-client for tests/test_socketio.py.
// Commands arrive on stdin as JSON lines; everything the client sees goes to stdout as JSON lines.
import { io } from "socket.io-client";
import { createInterface } from "node:readline";

const url = process.argv[2];
const tokens = [];
let socket = null;

function out(message) {
  process.stdout.write(JSON.stringify(message) + "\n");
}

const commands = {
  connect({ namespace = "", token, resume, reconnection = false, extraHeaders }) {
    if (token) tokens.push(token);
    socket = io(url + namespace, {
      transports: ["websocket"],
      reconnection,
      reconnectionDelay: 100,
      reconnectionDelayMax: 200,
      extraHeaders, // (Node only: a browser's page cannot set them, but its Origin is sent)
      // Called on every (re)connection: a fresh token each time, as an app would fetch one.
      auth: (cb) => {
        out({ type: "auth_called", left: tokens.length });
        cb(resume ? { token: tokens.shift(), resume } : { token: tokens.shift() });
      },
    });
    socket.on("connect", () => out({ type: "connect", id: socket.id }));
    socket.on("connect_error", (err) => out({ type: "connect_error", message: err.message }));
    socket.on("disconnect", (reason) => out({ type: "disconnect", reason }));
    socket.onAny((event, data) => out({ type: "event", event, data }));
  },
  token({ token }) {
    tokens.push(token);
  },
  emit({ event, data, ack = false }) {
    if (ack) {
      socket.emit(event, data, (result) => out({ type: "ack", event, result }));
    } else {
      socket.emit(event, data);
    }
  },
  close() {
    socket.close();
    out({ type: "closed" });
  },
};

createInterface({ input: process.stdin }).on("line", (line) => {
  const command = JSON.parse(line);
  commands[command.op](command);
});
out({ type: "ready" });
