// Drives real socket.io-client sockets for the Python tests.
// stdin: one JSON command per line; stdout: one JSON line per socket event.
//   {"cmd":"connect","id":"c1","url":"http://127.0.0.1:9001/site","opts":{...},"version":4,"brief":true}
//   (brief: strings longer than 256 characters in an event's arguments come back as
//   {"length": n}, so a test can count large events without reading them all back)
//   {"cmd":"emit","id":"c1","event":"room:join","args":["kitchen"],"ack":true,"seq":7}
//   {"cmd":"disconnect","id":"c1"}   {"cmd":"drop","id":"c1"}   {"cmd":"exit"}
// "drop" closes the socket's transport under it, as a lost network does: the client
// reconnects by itself (and recovers its session when it asked for recovery).
import { createInterface } from "node:readline";
import { io as io4 } from "socket.io-client";
import { io as io3 } from "socket.io-client-v3";

const sockets = new Map();
const out = (item, replacer) => process.stdout.write(JSON.stringify(item, replacer) + "\n");
const abridge = (key, value) => (typeof value === "string" && value.length > 256 ? { length: value.length } : value);

function connect({ id, url, opts, version, brief }) {
	const socket = (version === 3 ? io3 : io4)(url, opts);
	sockets.set(id, socket);
	socket.on("connect", () => out({ id, type: "connect", transport: socket.io.engine.transport.name, recovered: socket.recovered ?? null, sid: socket.id, pid: socket._pid ?? null }));
	socket.on("connect_error", (err) => out({ id, type: "connect_error", message: err.message, data: err.data ?? null }));
	socket.on("disconnect", (reason) => out({ id, type: "disconnect", reason }));
	socket.io.on("reconnect", (attempt) => out({ id, type: "reconnect", attempt }));
	socket.io.on("ping", () => out({ id, type: "ping" }));
	socket.io.on("open", () => socket.io.engine.on("upgrade", (transport) => out({ id, type: "upgrade", transport: transport.name })));
	socket.onAny((event, ...args) => out({ id, type: "event", event, args, at: Date.now() }, brief ? abridge : undefined));
}

function emit({ id, event, args, ack, seq }) {
	const socket = sockets.get(id);
	if (!socket) return out({ id, seq, type: "error", message: `no socket ${id}` });
	if (ack) socket.emit(event, ...args, (...reply) => out({ id, seq, type: "ack", args: reply }));
	else socket.emit(event, ...args);
}

const commands = {
	connect,
	emit,
	disconnect: ({ id }) => sockets.get(id)?.disconnect(),
	drop: ({ id }) => sockets.get(id)?.io.engine.close(),
	exit: () => {
		for (const socket of sockets.values()) socket.disconnect();
		process.exit(0);
	},
};

createInterface({ input: process.stdin }).on("line", (line) => {
	const command = JSON.parse(line);
	commands[command.cmd](command);
});
process.stdin.on("end", () => process.exit(0));
