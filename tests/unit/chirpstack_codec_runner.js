// Runs gateway/chirpstack_codec.js the way ChirpStack v4 does, for
// tests/unit/test_chirpstack_codec.py: the codec is a plain script evaluated
// in a context that has only the language built-ins (no require, module,
// process or Buffer), and each call's input is built inside that context, so
// arrays and dates belong to the codec's own realm as they do in QuickJS.
//
// stdin:  {"codec": path, "calls": [{"fn": name, "input": {...}, "fresh": bool}, ...]}
//         input.recvTime, when a string, becomes a Date.
// stdout: {"results": [{"result": ...} | {"exception": text}, ...],
//          "max_ms": slowest call, "leaked_globals": [names]}
//
// "fresh" calls repeat exactly what ChirpStack evaluates for every frame: a
// new context, the codec source followed by `decodeUplink(chirpstack_input)`.
// The others share one context, which is then checked for globals the codec
// created while running (it must be pure: ChirpStack keeps nothing between
// frames, so anything it relied on would be gone).

"use strict";

const fs = require("fs");
const vm = require("vm");

const request = JSON.parse(fs.readFileSync(0, "utf8"));
const source = fs.readFileSync(request.codec, "utf8");

const SET_INPUT =
  "var chirpstack_input = JSON.parse(chirpstack_input_json);\n" +
  "if (typeof chirpstack_input.recvTime === 'string') {\n" +
  "  chirpstack_input.recvTime = new Date(chirpstack_input.recvTime);\n" +
  "}\n";

const shared = vm.createContext({});
vm.runInContext(source, shared, { filename: request.codec });
const loaded = new Set(Object.getOwnPropertyNames(shared));

function call(c) {
  let ctx = shared;
  let script = SET_INPUT + c.fn + "(chirpstack_input)\n";
  if (c.fresh) {
    ctx = vm.createContext({});
    script = source + "\n\n" + script;
  }
  ctx.chirpstack_input_json = JSON.stringify(c.input);
  // Round-trip through JSON inside the host: the result must be plain data,
  // which is all ChirpStack keeps of it.
  return JSON.parse(JSON.stringify(vm.runInContext(script, ctx, { filename: request.codec })));
}

const results = [];
let maxMs = 0;
for (const c of request.calls) {
  const t0 = process.hrtime.bigint();
  try {
    results.push({ result: call(c) });
  } catch (e) {
    results.push({ exception: String(e && e.stack ? e.stack : e) });
  }
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  if (ms > maxMs) maxMs = ms;
}

// The harness itself sets chirpstack_input_json and chirpstack_input.
const harness = new Set(["chirpstack_input_json", "chirpstack_input"]);
const leaked = Object.getOwnPropertyNames(shared).filter((n) => !loaded.has(n) && !harness.has(n));

process.stdout.write(JSON.stringify({ results: results, max_ms: maxMs, leaked_globals: leaked }));
