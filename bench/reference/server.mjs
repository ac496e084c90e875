// The reference: the original design callgate replaces, written for the benchmark only.
// A `user-connected` map from user to socket, the five call events forwarded verbatim, no auth.
// Usage: node server.mjs PORT
import { Server } from "socket.io";

const port = Number(process.argv[2] || 9000);
const io = new Server(port, { transports: ["websocket"], maxHttpBufferSize: 1e6 });
const users = new Map();
const EVENTS = ["call-request", "call-answer", "call-reject", "call-end", "ice-candidate"];

io.on("connection", (socket) => {
  socket.on("user-connected", (user) => {
    users.set(user, socket.id);
    socket.data.user = user;
  });
  for (const event of EVENTS) {
    socket.on(event, (data) => {
      const target = data && users.get(data.to);
      if (target) io.to(target).emit(event, data);
    });
  }
  socket.on("disconnect", () => {
    if (users.get(socket.data.user) === socket.id) users.delete(socket.data.user);
  });
});
process.stdout.write(`listening ${port}\n`);
