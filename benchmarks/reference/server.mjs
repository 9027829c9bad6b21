#!/usr/bin/env node
// Reference realtime server for the benchmarks, in the shape of Frappe's Node realtime server:
// socket.io v4 with one regex parent namespace, an authentication middleware (one HTTP call
// to Frappe's get_user_info per connection, or a local HS256 check), a node-redis subscriber
// on Frappe's `events` channel and the app's `excel_restaurant_pos_events` channel, and
// `room:join` with an acknowledgement. It exists only to give the product a baseline.
//
//   node server.mjs --port 9101 --host 127.0.0.1 --redis-queue redis://127.0.0.1:6379 \
//        --auth-mode jwt|frappe [--frappe-url http://127.0.0.1:8000] [--websocket-compression true]
//
// The HS256 secret comes from EXCEL_RESTAURANT_POS_JWT_SECRET, the sites from
// EXCEL_RESTAURANT_POS_SITES (comma-separated, default "default").

import http from "node:http";
import jwt from "jsonwebtoken";
import { createClient } from "redis";
import { Server } from "socket.io";

function parseArgs(argv) {
	const opts = {
		port: 9001,
		host: "0.0.0.0",
		redisQueue: "redis://127.0.0.1:6379",
		authMode: "jwt",
		frappeUrl: "http://127.0.0.1:8000",
		frappeTimeout: 5,
		websocketCompression: false,
	};
	for (let i = 0; i < argv.length; i++) {
		const [flag, inline] = argv[i].split("=", 2);
		const value = () => (inline !== undefined ? inline : argv[++i]);
		switch (flag) {
			case "--port": opts.port = Number(value()); break;
			case "--host": opts.host = value(); break;
			case "--redis-queue": opts.redisQueue = value(); break;
			case "--auth-mode": opts.authMode = value(); break;
			case "--frappe-url": opts.frappeUrl = value().replace(/\/$/, ""); break;
			case "--frappe-timeout": opts.frappeTimeout = Number(value()); break;
			case "--websocket-compression": opts.websocketCompression = ["1", "true", "yes", "on"].includes(String(value()).toLowerCase()); break;
			default: throw new Error(`unknown option ${flag}`);
		}
	}
	if (!["jwt", "frappe"].includes(opts.authMode)) throw new Error("--auth-mode is jwt or frappe");
	return opts;
}

const opts = parseArgs(process.argv.slice(2));
const secret = process.env.EXCEL_RESTAURANT_POS_JWT_SECRET || "";
const sites = new Set((process.env.EXCEL_RESTAURANT_POS_SITES || "default").split(",").map((s) => s.trim()).filter(Boolean));
const APP_PREFIX = "/excel_restaurant_pos/";
let redisUp = false;

function siteOf(namespace) {
	const name = namespace.startsWith(APP_PREFIX) ? namespace.slice(APP_PREFIX.length) : namespace.slice(1);
	return sites.has(name) ? name : null;
}

function tokenOf(socket) {
	const header = socket.request.headers.authorization;
	if (header) {
		const match = /^bearer\s+(\S+)$/i.exec(header.trim());
		return match ? match[1] : null;
	}
	const auth = socket.handshake.auth && socket.handshake.auth.token;
	if (typeof auth === "string" && auth) return auth.replace(/^bearer\s+/i, "");
	return null;
}

async function identify(site, token) {
	if (opts.authMode === "jwt") {
		const claims = jwt.verify(token, secret, { algorithms: ["HS256"] });
		if (claims.type !== undefined && claims.type !== "access") throw new Error("wrong token type");
		return { user: claims.user || claims.sub, user_type: claims.user_type || "Website User" };
	}
	const response = await fetch(`${opts.frappeUrl}/api/method/frappe.realtime.get_user_info`, {
		headers: { Authorization: `Bearer ${token}`, "X-Frappe-Site-Name": site },
		signal: AbortSignal.timeout(opts.frappeTimeout * 1000),
	});
	const body = await response.json().catch(() => null);
	const info = body && body.message;
	if (response.status !== 200 || !info || !info.user || info.user === "Guest") throw new Error(`Frappe answered ${response.status}`);
	return info;
}

const httpServer = http.createServer((req, res) => {
	if (req.url === "/health") {
		res.writeHead(redisUp ? 200 : 503, { "Content-Type": "application/json" });
		res.end(JSON.stringify({ status: redisUp ? "ok" : "degraded", clients: io.engine.clientsCount }));
		return;
	}
	res.writeHead(404);
	res.end();
});
httpServer.listen({ port: opts.port, host: opts.host, backlog: 4096 });

const io = new Server(httpServer, {
	cors: { origin: true, credentials: true },
	perMessageDeflate: opts.websocketCompression ? { threshold: 1024 } : false,
});

const realtime = io.of(/^\/.*$/);
realtime.use(async (socket, next) => {
	const site = siteOf(socket.nsp.name);
	if (!site) return next(new Error("Invalid namespace"));
	const token = tokenOf(socket);
	if (!token) return next(new Error("Missing Authorization header. Bearer token required."));
	try {
		const info = await identify(site, token);
		socket.user = info.user;
		socket.user_type = info.user_type;
		next();
	} catch (err) {
		next(new Error(`Unauthorized: ${err.message}`));
	}
});

realtime.on("connection", (socket) => {
	socket.join(`user:${socket.user}`);
	socket.join("website");
	if (socket.user_type === "System User") socket.join("all");
	socket.on("room:join", (room, ack) => {
		const ok = typeof room === "string" && room.length > 0 && room.length <= 256;
		if (ok) {
			socket.join(room);
			socket.emit("room:joined", { room });
		} else {
			socket.emit("room:error", { room, message: "Invalid room" });
		}
		if (typeof ack === "function") ack(ok ? { ok: true, room } : { ok: false, room, error: "Invalid room" });
	});
	socket.on("room:leave", (room, ack) => {
		socket.leave(room);
		socket.emit("room:left", { room });
		if (typeof ack === "function") ack({ ok: true, room });
	});
});

function deliver(namespace, room, event, message) {
	const nsp = io.of(namespace);
	if (room) nsp.to(room).emit(event, message);
	else nsp.emit(event, message);
}

const subscriber = createClient({ url: opts.redisQueue });
subscriber.on("error", (err) => {
	redisUp = false;
	console.error(`redis: ${err.message}`);
});
subscriber.on("ready", () => { redisUp = true; });
await subscriber.connect();
await subscriber.subscribe(["events", "excel_restaurant_pos_events"], (raw, channel) => {
	let data;
	try {
		data = JSON.parse(raw);
	} catch {
		return;
	}
	if (channel === "events") {
		// Frappe v15+: {"event","message","room","namespace":"<site>"}
		if (!data.namespace) return;
		deliver(`/${data.namespace}`, data.room, data.event, data.message);
	} else {
		// The app: {"namespace":"/excel_restaurant_pos/<site>","room","event","message"}
		if (typeof data.namespace !== "string") return;
		deliver(data.namespace, data.room, data.event, data.message);
	}
});
redisUp = true;
console.error(`reference server listening on ${opts.host}:${opts.port}; redis ${opts.redisQueue}; auth ${opts.authMode}`);

function stop() {
	io.close();
	subscriber.quit().catch(() => {}).finally(() => process.exit(0));
	setTimeout(() => process.exit(0), 3000).unref();
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
