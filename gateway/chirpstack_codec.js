// ChirpStack v4 device-profile codec for frame protocol v1 (docs/protocol.md).
//
// Paste this whole file into the meter's device profile (Codec: JavaScript
// functions). ChirpStack evaluates it in QuickJS, a fresh runtime for every
// frame, with a 100 ms limit:
//
//   decodeUplink({bytes, fPort, recvTime, variables})  fPort 1: bundle or fragment
//   encodeDownlink({data, variables})                   fPort 2: command bytes
//   decodeDownlink({bytes, fPort})                      fPort 2: command fields
//
// firmware/meter/frame.py is the one definition of these bytes. This file
// reads and lays out the same bytes and refuses what that module refuses,
// with the same reason word first in every error ("truncated: bundle says 4
// readings, holds 3"), so an operator looking at ChirpStack's event log and
// the gateway's metrics sees the same words. Both are checked against
// tests/vectors/frames.json.
//
// Nothing here is proof. ChirpStack's codec runtime has no crypto, and the
// network server must never hold a meter's command key (else it could forge
// relay commands), so this codec neither verifies bundle signatures nor
// computes command tags: the gateway verifies every bundle and computes every
// tag, and encodeDownlink only places the tag it is given.
//
// Plain ES5 and pure functions: no require, no Buffer, no BigInt, no clock,
// no state kept between calls. JavaScript's bitwise operators work on signed
// 32-bit integers, so 32-bit fields and varints are built with arithmetic
// (a double holds every integer below 2^53 exactly), never with << or |.

var VERSION = 1;

// Frame types (low nibble of the header byte) and LoRaWAN application ports.
var TYPE_BUNDLE = 1;
var TYPE_FRAGMENT = 2;
var TYPE_COMMAND = 8;
var PORT_READING = 1;
var PORT_COMMAND = 2;

// Bundle: header, count, then the first reading in full (seq, t_end,
// import_dwh, export_dwh: 4 bytes each; flags: 1), later readings as flags
// and three varints, then the Ed25519 signature.
var SIG_LEN = 64;
var HEAD_LEN = 19;
var MAX_READINGS = 32;
var MIN_BUNDLE_LEN = HEAD_LEN + SIG_LEN;
var MAX_BUNDLE_LEN = HEAD_LEN + (MAX_READINGS - 1) * 16 + SIG_LEN;

// Fragment: header, tag (2 bytes), index << 4 | (count - 1), piece.
var FRAG_HEAD_LEN = 4;

// Command: header, counter (4), expires (4), opcode, arguments, tag (8).
var CMD_HEAD_LEN = 10;
var TAG_LEN = 8;

var U32_MAX = 4294967295;

// Bit k of a reading's flags byte.
var FLAG_NAMES = ["voltage_measured", "ct_missing", "ct_reversed", "clock_unsynced",
                  "clipped", "freq_range", "adc_fault", "restart"];

// Each opcode's arguments: name and width in bytes, in wire order.
var COMMANDS = {
  relay: {opcode: 1, args: [["mode", 1], ["hold_s", 2]]},
  interval: {opcode: 2, args: [["interval_s", 2]]},
  time: {opcode: 3, args: [["unix_s", 4]]},
  resend: {opcode: 4, args: [["first_seq", 4], ["count", 2]]}
};
var OP_NAMES = {1: "relay", 2: "interval", 3: "time", 4: "resend"};

// ------------------------------------------------------------- helpers

// Thrown inside the codec only; every entry point turns it into
// {errors: ["<reason>: <message>"]}. Anything else thrown is a bug in this
// file and is left for ChirpStack to report as a JS error.
function FrameError(reason, message) {
  this.reason = reason;
  this.message = message;
}

function fail(reason, message) {
  throw new FrameError(reason, message);
}

function errorResult(e) {
  if (e instanceof FrameError) {
    return {errors: [e.reason + ": " + e.message]};
  }
  throw e;
}

function isUint(v, max) {
  return typeof v === "number" && v >= 0 && v <= max && Math.floor(v) === v;
}

// The payload as an array of byte values, after checking it is one (an
// operator can call decodeDownlink by hand with anything).
function payloadBytes(input) {
  var b = input ? input.bytes : undefined;
  if (b === null || typeof b !== "object" || typeof b.length !== "number") {
    fail("field", "input.bytes is not a byte array");
  }
  for (var i = 0; i < b.length; i++) {
    if (!isUint(b[i], 255)) {
      fail("field", "input.bytes[" + i + "] is not a byte");
    }
  }
  return b;
}

function readUint(b, i, width) {
  var v = 0;
  for (var k = 0; k < width; k++) {
    v = v * 256 + b[i + k];
  }
  return v;
}

function putUint(out, v, width) {
  for (var k = width - 1; k >= 0; k--) {
    out.push(Math.floor(v / Math.pow(256, k)) % 256);
  }
}

var HEX = "0123456789abcdef";

function toHex(b, start, end) {
  var s = "";
  for (var i = start; i < end; i++) {
    s += HEX.charAt(b[i] >> 4) + HEX.charAt(b[i] & 15);
  }
  return s;
}

function fromHex(s) {
  var out = [];
  for (var i = 0; i < s.length; i += 2) {
    out.push(parseInt(s.substr(i, 2), 16));
  }
  return out;
}

// The type nibble after checking the version (frame.frame_type).
function frameType(b) {
  if (b.length === 0) {
    fail("empty", "empty frame");
  }
  var version = b[0] >> 4;
  if (version !== VERSION) {
    fail("version", "frame version " + version + ", this codec reads " + VERSION);
  }
  return b[0] & 15;
}

function checkPort(input, port, what) {
  var fPort = input ? input.fPort : undefined;
  if (fPort !== port) {
    fail("type", "fPort " + fPort + " carries no " + what + " (they use fPort " + port + ")");
  }
}

// ------------------------------------------------------------- bundles

// Unsigned LEB128, at most 32 bits, minimally encoded (frame._get_varint).
// Returns the value and the index after it as [value, index].
function getVarint(b, i, end, name) {
  var v = 0;
  var scale = 1;
  var shift = 0;
  for (;;) {
    if (i >= end) {
      fail("truncated", "bundle ends inside " + name);
    }
    var x = b[i];
    i += 1;
    if (shift === 28 && x > 15) {
      fail("field", name + " does not fit 32 bits");
    }
    v += (x & 127) * scale;
    if (!(x & 128)) {
      if (x === 0 && shift) {
        fail("field", name + " is not minimally encoded");
      }
      return [v, i];
    }
    shift += 7;
    scale *= 128;
  }
}

function reading(seq, tEnd, imp, exp, flags) {
  var names = [];
  for (var k = 0; k < 8; k++) {
    if (flags & (1 << k)) {
      names.push(FLAG_NAMES[k]);
    }
  }
  return {seq: seq, t_end: tEnd, import_dwh: imp, export_dwh: exp, flags: flags,
          flag_names: names, import_wh: imp / 10, export_wh: exp / 10};
}

function decodeBundle(b) {
  var size = b.length;
  if (size < MIN_BUNDLE_LEN) {
    fail("truncated", "bundle is " + size + " bytes, the shortest is " + MIN_BUNDLE_LEN);
  }
  if (size > MAX_BUNDLE_LEN) {
    fail("oversized", "bundle is " + size + " bytes, the longest is " + MAX_BUNDLE_LEN);
  }
  var n = b[1];
  if (n < 1 || n > MAX_READINGS) {
    fail("field", "bundle count " + n + " outside 1.." + MAX_READINGS);
  }
  var seq = readUint(b, 2, 4);
  var tEnd = readUint(b, 6, 4);
  var imp = readUint(b, 10, 4);
  var exp = readUint(b, 14, 4);
  var end = size - SIG_LEN;
  var readings = [reading(seq, tEnd, imp, exp, b[18])];
  var i = HEAD_LEN;
  for (var k = 1; k < n; k++) {
    if (i >= end) {
      fail("truncated", "bundle says " + n + " readings, holds " + k);
    }
    var flags = b[i];
    var dt = getVarint(b, i + 1, end, "dt of reading " + k);
    var di = getVarint(b, dt[1], end, "d_import of reading " + k);
    var de = getVarint(b, di[1], end, "d_export of reading " + k);
    i = de[1];
    if (dt[0] === 0) {
      fail("field", "reading " + k + " has dt 0");
    }
    seq += 1;
    tEnd += dt[0];
    imp += di[0];
    exp += de[0];
    if (seq > U32_MAX || tEnd > U32_MAX || imp > U32_MAX || exp > U32_MAX) {
      fail("field", "reading " + k + " overflows a 32-bit field");
    }
    readings.push(reading(seq, tEnd, imp, exp, flags));
  }
  if (i !== end) {
    fail("oversized", (end - i) + " bytes after " + n + " readings before the signature");
  }
  return {type: "bundle", count: n, readings: readings, signature: toHex(b, end, size)};
}

// ----------------------------------------------------------- fragments

function decodeFragment(b) {
  if (b.length <= FRAG_HEAD_LEN) {
    fail("truncated", "fragment of " + b.length + " bytes carries nothing");
  }
  var index = b[3] >> 4;
  var count = (b[3] & 15) + 1;
  if (count < 2 || index >= count) {
    fail("field", "fragment " + index + " of " + count);
  }
  return {type: "fragment", tag: readUint(b, 1, 2), index: index, count: count,
          piece: toHex(b, FRAG_HEAD_LEN, b.length)};
}

// ------------------------------------------------------------ commands

// Lays out a command from {counter, expires, op, args, tag}. The tag is the
// gateway's HMAC over the same bytes (frame.command_tag); this codec cannot
// check it, only that it is 8 bytes.
function encodeCommand(d) {
  if (d === null || typeof d !== "object") {
    fail("field", "data must be an object {counter, expires, op, args, tag}");
  }
  var op = d.op;
  if (typeof op !== "string" || !Object.prototype.hasOwnProperty.call(COMMANDS, op)) {
    fail("field", "unknown op " + op + " (relay, interval, time, resend)");
  }
  var spec = COMMANDS[op];
  if (!isUint(d.counter, U32_MAX) || d.counter < 1) {
    fail("field", "counter=" + d.counter + " outside 1.." + U32_MAX);
  }
  if (!isUint(d.expires, U32_MAX)) {
    fail("field", "expires=" + d.expires + " outside 0.." + U32_MAX);
  }
  var args = d.args;
  if (!Array.isArray(args) || args.length !== spec.args.length) {
    fail("field", "arguments of " + op + ": " + spec.args.length + " expected ("
         + argNames(spec) + ")");
  }
  for (var k = 0; k < args.length; k++) {
    var max = Math.pow(256, spec.args[k][1]) - 1;
    if (!isUint(args[k], max)) {
      fail("field", "arguments of " + op + ": " + spec.args[k][0] + "=" + args[k]
           + " outside 0.." + max);
    }
  }
  if (d.tag === undefined || d.tag === null) {
    fail("field", "tag missing: the gateway computes it with the meter's command key");
  }
  if (typeof d.tag !== "string" || !/^[0-9a-fA-F]{16}$/.test(d.tag)) {
    fail("field", "tag must be " + TAG_LEN + " bytes as " + 2 * TAG_LEN + " hex digits");
  }
  var out = [(VERSION << 4) | TYPE_COMMAND];
  putUint(out, d.counter, 4);
  putUint(out, d.expires, 4);
  out.push(spec.opcode);
  for (k = 0; k < args.length; k++) {
    putUint(out, args[k], spec.args[k][1]);
  }
  return out.concat(fromHex(d.tag));
}

function argNames(spec) {
  var names = [];
  for (var k = 0; k < spec.args.length; k++) {
    names.push(spec.args[k][0]);
  }
  return names.join(", ");
}

// frame.decode_command without the tag check ("auth"): the meter does that.
function decodeCommand(b) {
  var t = frameType(b);
  if (t !== TYPE_COMMAND) {
    fail("type", "frame type " + t + " is not a command (" + TYPE_COMMAND + ")");
  }
  if (b.length < CMD_HEAD_LEN + TAG_LEN) {
    fail("truncated", "command is " + b.length + " bytes, the shortest is "
         + (CMD_HEAD_LEN + TAG_LEN));
  }
  var opcode = b[9];
  if (!Object.prototype.hasOwnProperty.call(OP_NAMES, opcode)) {
    fail("opcode", "unknown opcode " + opcode);
  }
  var op = OP_NAMES[opcode];
  var spec = COMMANDS[op];
  var want = CMD_HEAD_LEN + TAG_LEN;
  for (var k = 0; k < spec.args.length; k++) {
    want += spec.args[k][1];
  }
  if (b.length !== want) {
    fail(b.length < want ? "truncated" : "oversized",
         op + " command is " + b.length + " bytes, expected " + want);
  }
  var args = [];
  var i = CMD_HEAD_LEN;
  for (k = 0; k < spec.args.length; k++) {
    args.push(readUint(b, i, spec.args[k][1]));
    i += spec.args[k][1];
  }
  return {counter: readUint(b, 1, 4), expires: readUint(b, 5, 4), op: op, args: args,
          tag: toHex(b, i, b.length)};
}

// -------------------------------------------------- ChirpStack entry points

function decodeUplink(input) {
  try {
    checkPort(input, PORT_READING, "uplink frames");
    var b = payloadBytes(input);
    var t = frameType(b);
    if (t === TYPE_BUNDLE) {
      return {data: decodeBundle(b), warnings: []};
    }
    if (t === TYPE_FRAGMENT) {
      return {data: decodeFragment(b), warnings: []};
    }
    fail("type", "frame type " + t + " is not an uplink type");
  } catch (e) {
    return errorResult(e);
  }
}

function encodeDownlink(input) {
  try {
    return {bytes: encodeCommand(input ? input.data : undefined), fPort: PORT_COMMAND};
  } catch (e) {
    return errorResult(e);
  }
}

function decodeDownlink(input) {
  try {
    checkPort(input, PORT_COMMAND, "commands");
    return {data: decodeCommand(payloadBytes(input)), warnings: []};
  } catch (e) {
    return errorResult(e);
  }
}
