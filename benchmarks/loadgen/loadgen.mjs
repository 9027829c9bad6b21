#!/usr/bin/env node
// Socket.IO load generator for the realtime benchmarks.
//
// One coordinator process forks W worker processes; each worker opens its share of the
// N clients with the official socket.io-client, joins each client to one of R rooms
// (`room:join` with an acknowledgement) and counts the bench events it receives.
//
// Control is JSON lines: the coordinator prints one JSON object per line on stdout and reads
// commands from stdin (after the tokens, when they come from stdin):
//
//   -> {"type":"connected", ...}        after every client connected (or failed) and joined
//   <- {"cmd":"arm"}                    forget what was received so far
//   -> {"type":"armed"}
//   <- {"cmd":"collect","expected":E,"publish_start_ms":T,"timeout_s":S,"idle_s":I}
//   -> {"type":"deliveries", ...}       once E deliveries arrived, or nothing came for I s,
//                                       or S s passed
//   <- {"cmd":"exit"}                   disconnect everything and exit
//
// Every phase has a deadline and the whole process exits by itself after --max-seconds.

import { fork } from "node:child_process";
import { Agent } from "node:http";
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { io } from "socket.io-client";

const HERE = fileURLToPath(import.meta.url);

function parseArgs(argv) {
	const opts = {
		url: "http://127.0.0.1:9001/excel_restaurant_pos/default",
		tokens: "-", // a JSON file with a list of tokens, or "-" for one JSON line on stdin
		transport: "websocket",
		rooms: 10,
		roomPrefix: "bench-room-",
		event: "bench_tick",
		workers: 1,
		concurrency: 0, // connects in flight per worker; 0 = all at once
		connectTimeout: 60,
		maxSeconds: 600,
		deflate: false,
		via: "auth", // auth payload {token} or Authorization header
		join: true,
	};
	for (let i = 0; i < argv.length; i++) {
		const [flag, inline] = argv[i].split("=", 2);
		const value = () => (inline !== undefined ? inline : argv[++i]);
		switch (flag) {
			case "--url": opts.url = value(); break;
			case "--tokens": opts.tokens = value(); break;
			case "--transport": opts.transport = value(); break;
			case "--rooms": opts.rooms = Number(value()); break;
			case "--room-prefix": opts.roomPrefix = value(); break;
			case "--event": opts.event = value(); break;
			case "--workers": opts.workers = Number(value()); break;
			case "--concurrency": opts.concurrency = Number(value()); break;
			case "--connect-timeout": opts.connectTimeout = Number(value()); break;
			case "--max-seconds": opts.maxSeconds = Number(value()); break;
			case "--deflate": opts.deflate = true; break;
			case "--via": opts.via = value(); break;
			case "--no-join": opts.join = false; break;
			case "--recover": opts.recover = true; break;
			case "--keep-alive": opts.keepAlive = true; break;
			case "--worker": opts.worker = true; break;
			default: throw new Error(`unknown option ${flag}`);
		}
	}
	if (!["websocket", "polling"].includes(opts.transport)) throw new Error("--transport is websocket or polling");
	return opts;
}

const nowMs = () => performance.timeOrigin + performance.now();

function percentile(sorted, p) {
	if (!sorted.length) return null;
	const index = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
	return sorted[index];
}

// ---------------------------------------------------------------------------------------
// Worker: a slice of the clients.

function runWorker(opts) {
	const sockets = [];
	const keepAliveAgent = new Agent({ keepAlive: true });
	let armed = false;
	let received = 0;
	let latencies = [];
	let firstAt = null;
	let lastAt = null;
	let unexpected = 0;

	function socketOptions(token) {
		const options = {
			transports: [opts.transport],
			reconnection: false,
			forceNew: true,
			timeout: opts.connectTimeout * 1000,
			// engine.io-client offers permessage-deflate by default ({threshold: 1024});
			// it is offered only when asked, so "off" means the extension is never negotiated.
			perMessageDeflate: opts.deflate ? { threshold: 1024 } : false,
		};
		// Node's client opens a new connection for every poll unless given an agent; a
		// browser keeps its connections to the server alive between polls.
		if (opts.keepAlive) options.agent = keepAliveAgent;
		if (opts.via === "header") options.extraHeaders = { Authorization: `Bearer ${token}` };
		else options.auth = { token };
		// Connection state recovery, as the README shows it (the header carries no options).
		if (opts.recover) options.auth = { ...options.auth, recover: true };
		return options;
	}

	function onEvent(payload) {
		const at = nowMs();
		if (!armed) return;
		if (!payload || typeof payload.sent_at !== "number") {
			unexpected++;
			return;
		}
		received++;
		latencies.push(at - payload.sent_at);
		if (firstAt === null) firstAt = at;
		lastAt = at;
	}

	function connectOne(index, token, room) {
		return new Promise((resolve) => {
			const started = nowMs();
			// Several servers (--url a,b): the clients are dealt out among them in turn.
			const urls = opts.url.split(",");
			const socket = io(urls[index % urls.length], socketOptions(token));
			sockets.push(socket);
			let done = false;
			const finish = (result) => {
				if (done) return;
				done = true;
				clearTimeout(timer);
				resolve({ ...result, ms: nowMs() - started });
			};
			const timer = setTimeout(() => finish({ ok: false, error: "timeout" }), opts.connectTimeout * 1000 + 1000);
			socket.on(opts.event, onEvent);
			socket.on("connect_error", (err) => finish({ ok: false, error: String(err && err.message) }));
			socket.on("connect", () => {
				if (!opts.join) return finish({ ok: true });
				socket.timeout(opts.connectTimeout * 1000).emit("room:join", room, (err, ack) => {
					if (err) finish({ ok: false, error: "join timeout" });
					else if (ack && ack.ok === false) finish({ ok: false, error: `join refused: ${ack.error}` });
					else finish({ ok: true });
				});
			});
		});
	}

	async function connectAll(items) {
		const results = new Array(items.length);
		const limit = opts.concurrency > 0 ? opts.concurrency : items.length;
		let next = 0;
		async function lane() {
			while (next < items.length) {
				const mine = next++;
				const { index, token, room } = items[mine];
				results[mine] = await connectOne(index, token, room);
			}
		}
		await Promise.all(Array.from({ length: Math.min(limit, items.length) }, lane));
		return results;
	}

	let progressTimer = null;
	process.on("message", async (message) => {
		if (message.cmd === "connect") {
			const started = nowMs();
			const results = await connectAll(message.items);
			const errors = {};
			let connected = 0;
			const times = [];
			for (const r of results) {
				times.push(r.ms);
				if (r.ok) connected++;
				else errors[r.error] = (errors[r.error] || 0) + 1;
			}
			process.send({ type: "connected", connected, failed: results.length - connected, errors, started, finished: nowMs(), times });
		} else if (message.cmd === "arm") {
			armed = true;
			received = 0;
			latencies = [];
			firstAt = lastAt = null;
			unexpected = 0;
			clearInterval(progressTimer);
			progressTimer = setInterval(() => process.send({ type: "progress", received, lastAt }), 100);
			process.send({ type: "armed" });
		} else if (message.cmd === "collect") {
			clearInterval(progressTimer);
			armed = false;
			const disconnected = sockets.filter((s) => !s.connected).length;
			process.send({ type: "deliveries", received, latencies, firstAt, lastAt, unexpected, disconnected });
		} else if (message.cmd === "exit") {
			clearInterval(progressTimer);
			for (const socket of sockets) socket.disconnect();
			setTimeout(() => process.exit(0), 200);
		}
	});
	setTimeout(() => process.exit(3), opts.maxSeconds * 1000).unref();
	process.on("disconnect", () => process.exit(0));
}

// ---------------------------------------------------------------------------------------
// Coordinator.

function emit(object) {
	process.stdout.write(JSON.stringify(object) + "\n");
}

async function runCoordinator(opts) {
	const hardStop = setTimeout(() => {
		emit({ type: "error", error: `gave up after --max-seconds ${opts.maxSeconds}` });
		process.exit(2);
	}, opts.maxSeconds * 1000);
	hardStop.unref();

	const lines = createInterface({ input: process.stdin });
	const pending = [];
	const waiters = [];
	lines.on("line", (line) => {
		if (!line.trim()) return;
		if (waiters.length) waiters.shift()(line);
		else pending.push(line);
	});
	lines.on("close", () => {
		while (waiters.length) waiters.shift()(null);
		pending.push(null);
	});
	const nextLine = () => (pending.length ? Promise.resolve(pending.shift()) : new Promise((resolve) => waiters.push(resolve)));

	const tokenText = opts.tokens === "-" ? await nextLine() : readFileSync(opts.tokens, "utf8");
	const tokens = JSON.parse(tokenText);
	if (!Array.isArray(tokens) || !tokens.length) throw new Error("tokens: expected a non-empty JSON list");

	const workerCount = Math.max(1, Math.min(opts.workers, tokens.length));
	const workerArgs = process.argv.slice(2).filter((a) => a !== "--worker").concat(["--worker"]);
	const workers = [];
	for (let w = 0; w < workerCount; w++) {
		const child = fork(HERE, workerArgs, { stdio: ["ignore", "inherit", "inherit", "ipc"] });
		child.inbox = [];
		child.waiters = [];
		child.progress = { received: 0, lastAt: null };
		child.on("message", (message) => {
			if (message.type === "progress") {
				child.progress = message;
				return;
			}
			if (child.waiters.length) child.waiters.shift()(message);
			else child.inbox.push(message);
		});
		child.on("exit", (code) => {
			while (child.waiters.length) child.waiters.shift()({ type: "exit", code });
			child.inbox.push({ type: "exit", code });
		});
		child.next = () => (child.inbox.length ? Promise.resolve(child.inbox.shift()) : new Promise((resolve) => child.waiters.push(resolve)));
		workers.push(child);
	}
	const all = (cmd) => Promise.all(workers.map((child) => { child.send(cmd); return child.next(); }));

	// Clients are numbered 0..N-1; client i joins room i % R and goes to worker i % W.
	const slices = workers.map(() => []);
	tokens.forEach((token, index) => {
		slices[index % workerCount].push({ index, token, room: opts.roomPrefix + (index % opts.rooms) });
	});
	const connectStart = nowMs();
	const answers = await Promise.all(workers.map((child, w) => { child.send({ cmd: "connect", items: slices[w] }); return child.next(); }));
	const connectEnd = nowMs();
	let connected = 0;
	let failed = 0;
	const errors = {};
	let times = [];
	for (const a of answers) {
		if (a.type !== "connected") throw new Error(`worker ended during connect (${JSON.stringify(a)})`);
		connected += a.connected;
		failed += a.failed;
		for (const [k, v] of Object.entries(a.errors)) errors[k] = (errors[k] || 0) + v;
		times = times.concat(a.times);
	}
	times.sort((x, y) => x - y);
	const durationS = (connectEnd - connectStart) / 1000;
	emit({
		type: "connected",
		clients: tokens.length,
		connected,
		failed,
		errors,
		connect_duration_s: durationS,
		connects_per_s: durationS > 0 ? connected / durationS : null,
		connect_ms_p50: percentile(times, 50),
		connect_ms_p99: percentile(times, 99),
		connect_ms_max: times.length ? times[times.length - 1] : null,
		workers: workerCount,
		transport: opts.transport,
		deflate: opts.deflate,
	});

	for (;;) {
		const line = await nextLine();
		if (line === null) break;
		let command;
		try {
			command = JSON.parse(line);
		} catch {
			emit({ type: "error", error: `not JSON: ${line.slice(0, 80)}` });
			continue;
		}
		if (command.cmd === "arm") {
			for (const child of workers) child.progress = { received: 0, lastAt: null };
			await all({ cmd: "arm" });
			emit({ type: "armed" });
		} else if (command.cmd === "collect") {
			const expected = Number(command.expected) || 0;
			const timeoutS = Number(command.timeout_s) || 60;
			const idleS = Number(command.idle_s) || 5;
			const deadline = nowMs() + timeoutS * 1000;
			let lastTotal = -1;
			let lastChange = nowMs();
			let stop = "deadline";
			while (nowMs() < deadline) {
				const total = workers.reduce((sum, child) => sum + child.progress.received, 0);
				if (total >= expected) { stop = "complete"; break; }
				if (total !== lastTotal) { lastTotal = total; lastChange = nowMs(); }
				else if (nowMs() - lastChange > idleS * 1000) { stop = "idle"; break; }
				await new Promise((resolve) => setTimeout(resolve, 50));
			}
			if (stop === "complete") await new Promise((resolve) => setTimeout(resolve, 150)); // let the last progress ticks settle
			const parts = await all({ cmd: "collect" });
			let received = 0;
			let unexpected = 0;
			let disconnected = 0;
			let firstAt = null;
			let lastAt = null;
			let lat = [];
			for (const p of parts) {
				received += p.received;
				unexpected += p.unexpected;
				disconnected += p.disconnected;
				lat = lat.concat(p.latencies);
				if (p.firstAt !== null && (firstAt === null || p.firstAt < firstAt)) firstAt = p.firstAt;
				if (p.lastAt !== null && (lastAt === null || p.lastAt > lastAt)) lastAt = p.lastAt;
			}
			lat.sort((x, y) => x - y);
			const start = Number(command.publish_start_ms) || firstAt;
			const windowS = lastAt !== null && start ? (lastAt - start) / 1000 : null;
			emit({
				type: "deliveries",
				stop,
				expected,
				received,
				lost: Math.max(0, expected - received),
				loss_ratio: expected ? Math.max(0, expected - received) / expected : 0,
				extra: Math.max(0, received - expected),
				unexpected_payloads: unexpected,
				disconnected_clients: disconnected,
				window_s: windowS,
				deliveries_per_s: windowS ? received / windowS : null,
				latency_ms_p50: percentile(lat, 50),
				latency_ms_p90: percentile(lat, 90),
				latency_ms_p99: percentile(lat, 99),
				latency_ms_max: lat.length ? lat[lat.length - 1] : null,
			});
		} else if (command.cmd === "exit") {
			break;
		} else {
			emit({ type: "error", error: `unknown command ${command.cmd}` });
		}
	}
	for (const child of workers) if (child.connected) child.send({ cmd: "exit" });
	await Promise.race([
		Promise.all(workers.map((child) => (child.exitCode !== null ? null : new Promise((resolve) => child.on("exit", resolve))))),
		new Promise((resolve) => setTimeout(resolve, 5000)),
	]);
	for (const child of workers) if (child.exitCode === null) child.kill("SIGKILL");
	emit({ type: "bye" });
	process.exit(0);
}

const opts = parseArgs(process.argv.slice(2));
if (opts.worker) runWorker(opts);
else runCoordinator(opts).catch((err) => {
	emit({ type: "error", error: String(err && err.stack || err) });
	process.exit(1);
});
