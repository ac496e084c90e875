// The callgate browser demo: the browser's WebSocket and RTCPeerConnection, nothing else.
// docs/protocol.md is the contract this page speaks.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
// In a sandbox without networks, the test runs both pages on one machine: keep ICE on loopback.
const loopbackOnly = params.get("loopback") === "1";
// What a reload must not lose (the session id, the call), kept for this tab only.
const STORE = "callgate-demo";
// Coming back after a lost connection: 0.5 s doubling to 10 s, with jitter, at most 20 tries.
const RETRY = { first: 0.5, max: 10, attempts: 20 };
// After these the server does not want us back (docs/protocol.md, close codes).
const FINAL_CLOSES = new Set([1003, 1009, 4003, 4010, 4029]);

// Why a call ended (call-end's `reason`), as the page says it.
const REASONS = {
  timeout: "nobody answered",
  cancelled: "the caller hung up",
  answered_elsewhere: "answered on another of your devices",
  rejected_elsewhere: "declined on another of your devices",
  peer_disconnected: "the other side lost its connection",
  revoked: "access was revoked",
  server_shutdown: "the server is restarting",
  ended_by_operator: "an operator ended the call",
};
// Why a call to us was missed (missed-calls' `reason`).
const MISSED = {
  unavailable: "you were not online",
  timeout: "nobody answered",
  cancelled: "they hung up before you answered",
  peer_disconnected: "the connection was lost",
};
// Why a call we placed was refused (call-reject's `reason`), naming the callee.
const REFUSALS = {
  unavailable: (peer) => `${peer} is not online.`,
  busy: (peer) => `${peer} is in another call.`,
  glare: (peer) => `You and ${peer} called each other at once; ${peer}'s call wins.`,
  rejected: (peer) => `${peer} declined.`,
};

const app = {
  ws: null,
  url: null,
  session: null,
  sessionId: null, // the latest one: the only one the server accepts for a resume
  user: null,
  iceServers: [],
  // {id, peer, media, role: "caller"|"callee", answered, offer?, outbox: [candidates held]}
  call: null,
  pc: null,
  localStream: null,
  pendingCandidates: [],
  nextRef: 1,
  sent: new Map(), // ref -> {event, callId} of the message, until its ack or error
  missed: [], // ids of the missed calls shown, acknowledged when dismissed
  errors: [], // every error the server sent, for the end-to-end test and curious developers
  retry: null, // {why, attempt, wake} while reconnecting
  epoch: 0, // counts sign-ins and sign-outs: an attempt of an earlier one gives up
  inbox: Promise.resolve(), // messages are handled one after another, in the order they came
};
window.callgate = app; // for the end-to-end test and for curious developers

function status(text) {
  $("status").textContent = text;
}

// The connection's own line, so that a call's outcome in `status` stays readable next to it.
function notice(text) {
  $("notice").textContent = text;
}

function show(section, visible) {
  $(section).hidden = !visible;
}

function setConnection(text, on) {
  $("connection").textContent = text;
  $("connection").className = "pill " + (on ? "on" : "off");
}

function setCallState(state) {
  $("call-state").textContent = state;
  $("call-state").className = "pill" + (state === "connected" ? " on" : "");
}

function save() {
  if (!app.user || !app.sessionId) return sessionStorage.removeItem(STORE);
  const call = app.call && {
    id: app.call.id, peer: app.call.peer, media: app.call.media, role: app.call.role,
    answered: app.call.answered, offer: app.call.answered ? undefined : app.call.offer,
  };
  sessionStorage.setItem(STORE, JSON.stringify({ user: app.user, url: app.url, sessionId: app.sessionId, call }));
}

function restore() {
  try {
    return JSON.parse(sessionStorage.getItem(STORE) || "null");
  } catch {
    return null;
  }
}

function send(event, data) {
  const ws = app.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN) {
    console.info(`not connected: ${event} not sent`);
    return;
  }
  const ref = app.nextRef++;
  app.sent.set(ref, { event, callId: (data && (data.callId || data.id)) || null });
  ws.send(JSON.stringify({ event, data, ref }));
}

// Messages about the call in progress only: anything else is late news about one that is over.
function current(data) {
  return app.call !== null && data.callId === app.call.id;
}

async function fetchToken(user) {
  const response = await fetch("/token?user=" + encodeURIComponent(user));
  if (!response.ok) throw new Error((await response.json()).message);
  return (await response.json()).token;
}

class Closed extends Error {
  constructor(closed) {
    super(closed.reason ? `${closed.reason} (${closed.code})` : `connection closed (${closed.code})`);
    this.code = closed.code;
  }
}

// One connection attempt: resolves when the server says `session`, rejects if it closes first.
async function connect(resume) {
  const epoch = app.epoch;
  const token = await fetchToken(app.user);
  if (!app.url) app.url = (await (await fetch("/config.json")).json()).url;
  if (app.epoch !== epoch) throw new Error("signed out meanwhile");
  setConnection("connecting", false);
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(app.url);
    let established = false;
    app.ws = ws;
    app.sent.clear();
    ws.onopen = () => ws.send(JSON.stringify({ event: "auth", data: resume ? { token, resume } : { token } }));
    ws.onmessage = (message) => {
      const parsed = JSON.parse(message.data);
      if (parsed.event === "session" && !established) {
        established = true;
        resolve();
      }
      app.inbox = app.inbox.then(() => onMessage(parsed)).catch((error) => console.error(error));
    };
    ws.onclose = (closed) => {
      if (app.ws !== ws) return reject(new Error("signed out meanwhile"));
      setConnection("disconnected", false);
      if (established) onClose(closed);
      else reject(new Closed(closed));
    };
  });
}

async function signIn() {
  const user = $("user").value.trim();
  if (!user) return status("Type a name first.");
  stopRetry();
  app.epoch += 1;
  app.user = user;
  app.sessionId = null;
  notice("");
  await connect(null);
}

function onClose(closed) {
  const why = closed.code === 1001
    ? `The server is restarting (${closed.code} ${closed.reason})`
    : `Connection lost (${closed.code}${closed.reason ? " " + closed.reason : ""})`;
  if (FINAL_CLOSES.has(closed.code)) return stayOut(`Disconnected: ${closed.reason} (${closed.code}).`);
  // Anything else (network change, expired token, restart): come back with a fresh token and
  // resume the session, so a call in progress survives.
  reconnect(why, false);
}

function backoff(attempt) {
  const ceiling = Math.min(RETRY.max, RETRY.first * 2 ** (attempt - 1));
  return ceiling * (0.5 + Math.random() / 2); // jitter, so that the pages of a restart spread out
}

// Try again until connected, signed out, refused for good, or out of attempts.
async function reconnect(why, now) {
  stopRetry();
  const retry = { why, attempt: 0, wake: null };
  app.retry = retry;
  let last = "";
  while (app.retry === retry) {
    retry.attempt += 1;
    if (retry.attempt > RETRY.attempts) {
      return stayOut(`${why}; could not reconnect after ${RETRY.attempts} attempts (${last}). Sign in again.`);
    }
    const seen = `(attempt ${retry.attempt} of ${RETRY.attempts}${last ? "; last: " + last : ""})`;
    if (!(now && retry.attempt === 1)) {
      const delay = backoff(retry.attempt);
      notice(`${why}; reconnecting in ${delay.toFixed(1)}s… ${seen}`);
      await new Promise((resolve) => {
        retry.wake = resolve;
        setTimeout(resolve, delay * 1000);
      });
      if (app.retry !== retry) return;
    }
    notice(`${why}; reconnecting now… ${seen}`);
    try {
      await connect(app.sessionId);
    } catch (error) {
      if (app.retry !== retry) return;
      last = error.message;
      if (error instanceof Closed && FINAL_CLOSES.has(error.code)) return stayOut(`${why}; refused: ${last}.`);
      continue;
    }
    if (app.retry === retry) app.retry = null;
    notice(now ? "" : `Reconnected after: ${why}.`);
    return;
  }
}

function stopRetry() {
  const retry = app.retry;
  app.retry = null;
  if (retry && retry.wake) retry.wake();
}

// Not coming back by ourselves: the call is over and the user signs in again, or not.
function stayOut(text) {
  stopRetry();
  app.epoch += 1;
  if (app.call) endCall("the connection is gone");
  app.session = null;
  app.sessionId = null;
  save();
  notice(text);
  setConnection("signed out", false);
  show("signin", true);
  show("dialer", false);
  show("signout", false);
}

function signOut() {
  stopRetry();
  app.epoch += 1;
  if (app.call) {
    const call = app.call;
    const ringing = call.role === "callee" && !call.answered;
    send(ringing ? "call-reject" : "call-end", { callId: call.id, to: call.peer });
    endCall("You signed out.");
  }
  const ws = app.ws;
  app.ws = null;
  if (ws) ws.close(1000, "signed out");
  app.session = null;
  app.sessionId = null;
  save();
  notice("");
  setConnection("signed out", false);
  show("signin", true);
  show("dialer", false);
  show("signout", false);
}

async function onMessage(message) {
  const { event, data, ref } = message;
  switch (event) {
    case "session": {
      app.session = data;
      app.sessionId = data.sessionId;
      app.iceServers = data.iceServers;
      save();
      setConnection("online as " + data.user, true);
      $("me").textContent = data.user;
      show("signin", false);
      show("signout", true);
      show("dialer", !app.call);
      if (data.resumed === true && app.call) await resumeCall();
      else if (data.resumed === false && app.call) endCall("the call could not be resumed");
      break;
    }
    case "token-expiring":
      send("auth", { token: await fetchToken(app.user) });
      break;
    case "ack":
      app.sent.delete(ref);
      break;
    case "call-request":
      return onIncoming(data);
    case "call-pending": // a server with offline = "notify": the callee's phone is being woken
      if (!current(data)) return;
      setCallState("waking up");
      return status(`Waking ${app.call.peer}'s phone...`);
    case "call-ringing":
      if (!current(data)) return;
      setCallState("ringing");
      return status(`Calling ${app.call.peer}...`);
    case "missed-calls":
      return showMissed(data.calls || []);
    case "call-answer":
      return onAnswer(data);
    case "call-reject": {
      if (!current(data)) return;
      const refusal = REFUSALS[data.reason] || REFUSALS.rejected;
      return endCall(data.reason || "rejected", refusal(app.call.peer));
    }
    case "call-end":
      if (!current(data)) return;
      return endCall(data.reason ? REASONS[data.reason] || data.reason : data.from + " hung up");
    case "ice-candidate":
      if (!current(data)) return;
      // Until our peer connection has the other side's description (we still ring, or a new
      // one is being negotiated), keep the candidates for it.
      if (!app.pc || !app.pc.remoteDescription) {
        app.pendingCandidates.push(data.candidate);
        return;
      }
      await addCandidate(data.candidate);
      break;
    case "call-renegotiate":
      if (!current(data)) return;
      return onRenegotiate(data);
    case "error": {
      app.errors.push(data);
      const about = app.sent.get(ref);
      app.sent.delete(ref);
      const text = `Refused: ${data.message} (${data.code})`;
      if (about && about.callId) {
        // Refused because the call ended on the way (the other side hung up as we spoke): the
        // call's outcome is already on the page, and this says nothing new.
        if (!app.call || app.call.id !== about.callId) {
          console.info(`refused for a call that is over: ${data.code}`);
          break;
        }
        if (about.event === "call-request") return endCall(data.code, text); // it never rang
      }
      status(text);
      break;
    }
  }
}

async function getMedia(call) {
  const constraints = { audio: true, video: call.media === "video" };
  const stream = await navigator.mediaDevices.getUserMedia(constraints);
  if (app.call !== call) {
    // The call ended while the camera started.
    stream.getTracks().forEach((track) => track.stop());
    return false;
  }
  if (app.localStream) app.localStream.getTracks().forEach((track) => track.stop());
  app.localStream = stream;
  $("local").srcObject = stream;
  return true;
}

function newPeerConnection() {
  const pc = new RTCPeerConnection({ iceServers: app.iceServers });
  const call = app.call;
  if (app.pc) closePeerConnection(app.pc);
  app.pc = pc;
  pc.onicecandidate = ({ candidate }) => {
    // For this connection of the call in progress only: a closed call gets nothing more.
    if (app.call !== call || app.pc !== pc) return;
    if (candidate && loopbackOnly && !candidate.candidate.includes(" 127.0.0.1 ")) return;
    const data = { callId: call.id, to: call.peer, candidate: candidate && candidate.toJSON() };
    // Until the callee answers, the call may be refused at any moment (not online, busy):
    // hold the candidates, so that none is sent for a call the server has already ended.
    if (call.answered) send("ice-candidate", data);
    else call.outbox.push(data);
  };
  pc.ontrack = ({ streams }) => {
    if (app.pc === pc) $("remote").srcObject = streams[0];
  };
  pc.onconnectionstatechange = () => {
    if (app.call !== call || app.pc !== pc) return;
    const state = pc.connectionState;
    setCallState(state);
    if (state === "connected") status("Connected.");
  };
  for (const track of app.localStream.getTracks()) pc.addTrack(track, app.localStream);
  return pc;
}

function closePeerConnection(pc) {
  pc.onicecandidate = null;
  pc.ontrack = null;
  pc.onconnectionstatechange = null;
  pc.close();
}

function flushOutbox() {
  const call = app.call;
  const held = call.outbox;
  call.outbox = [];
  for (const data of held) send("ice-candidate", data);
}

// Missed calls, shown until dismissed; dismissing acknowledges them (for every device of ours).
function showMissed(calls) {
  const list = $("missed-list");
  list.replaceChildren(
    ...calls.map((call) => {
      const item = document.createElement("li");
      const when = call.time ? new Date(call.time).toLocaleString() : "";
      item.textContent = `${call.from} (${call.type}) ${when}: ${MISSED[call.reason] || call.reason}`;
      return item;
    }),
  );
  app.missed = calls.map((call) => call.id);
  show("missed", calls.length > 0);
}

function dismissMissed() {
  if (app.missed && app.missed.length) send("missed-calls-ack", { ids: app.missed });
  app.missed = [];
  show("missed", false);
}

function showCall(state) {
  $("peer").textContent = app.call.peer;
  setCallState(state);
  show("dialer", false);
  show("incoming", false);
  show("call", true);
}

async function placeCall(media) {
  const peer = $("callee").value.trim();
  if (!peer) return status("Whom do you want to call?");
  if (app.call) return;
  const call = { id: crypto.randomUUID(), peer, media, role: "caller", answered: false, outbox: [] };
  app.call = call;
  showCall("ringing");
  status(`Calling ${peer}...`);
  try {
    if (!(await getMedia(call))) return;
  } catch (error) {
    return endCall("no media", `No camera or microphone: ${error.message}`);
  }
  const pc = newPeerConnection();
  const offer = await pc.createOffer();
  await pc.setLocalDescription(offer);
  if (app.call !== call) return;
  send("call-request", {
    id: call.id, from: app.user, to: peer, type: media,
    offer: { type: "offer", sdp: offer.sdp }, timestamp: Date.now(),
  });
  save();
}

function onIncoming(data) {
  if (app.call) return; // the server already refused a second call: we are busy
  app.call = {
    id: data.id, peer: data.from, media: data.type, role: "callee", answered: false,
    offer: data.offer, outbox: [],
  };
  save();
  showIncoming();
}

function showIncoming() {
  const call = app.call;
  $("caller").textContent = call.peer;
  $("incoming-media").textContent = call.media;
  show("dialer", false);
  show("call", false);
  show("incoming", true);
  status(`${call.peer} is calling.`);
}

async function answer() {
  const call = app.call;
  if (!call || call.answered) return;
  if (!(await getMedia(call))) return;
  const pc = newPeerConnection();
  await pc.setRemoteDescription(call.offer);
  await flushCandidates();
  const reply = await pc.createAnswer();
  await pc.setLocalDescription(reply);
  if (app.call !== call) return;
  send("call-answer", { callId: call.id, to: call.peer, answer: { type: "answer", sdp: reply.sdp } });
  call.answered = true;
  save();
  flushOutbox();
  showCall("connecting");
}

async function onAnswer(data) {
  if (!current(data)) return;
  const call = app.call;
  call.answered = true;
  save();
  setCallState("connecting");
  // The page was reloaded while it rang: the offer this answers went with the old page.
  if (!app.pc) return renewMedia(call);
  await app.pc.setRemoteDescription(data.answer);
  flushOutbox();
  await flushCandidates();
}

function reject() {
  const call = app.call;
  if (!call) return;
  send("call-reject", { callId: call.id, to: call.peer });
  endCall("declined", "You declined.");
}

function hangUp() {
  if (app.call) send("call-end", { callId: app.call.id, to: app.call.peer });
  endCall("hangup", "Call ended: you hung up.");
}

async function addCandidate(candidate) {
  try {
    await app.pc.addIceCandidate(candidate || null);
  } catch (error) {
    console.warn("ICE candidate refused", error);
  }
}

async function flushCandidates() {
  const waiting = app.pendingCandidates;
  app.pendingCandidates = [];
  for (const candidate of waiting) await addCandidate(candidate);
}

// The session came back with our call (docs/protocol.md 2b). The peer connection survived if
// only the socket dropped; after a page reload it is gone and a new one takes its place.
async function resumeCall() {
  const call = app.call;
  if (app.pc) {
    if (call.answered) await restartIce();
    return;
  }
  if (call.role === "callee" && !call.answered) return showIncoming(); // still ringing here
  showCall(call.answered ? "reconnecting" : "ringing");
  status(call.answered ? `Back in the call with ${call.peer}; restoring the media.` : `Calling ${call.peer}...`);
  if (call.answered) await renewMedia(call);
}

// A new peer connection for a call in progress, offered to the peer as call-renegotiate: its
// certificate is new, so the peer starts a new connection too (see onRenegotiate).
async function renewMedia(call) {
  app.pendingCandidates = [];
  if (!(await getMedia(call))) return;
  const pc = newPeerConnection();
  const offer = await pc.createOffer();
  await pc.setLocalDescription(offer);
  if (app.call !== call) return;
  send("call-renegotiate", { callId: call.id, to: call.peer, description: { type: "offer", sdp: offer.sdp } });
}

// After a resume the media path may be gone: an ICE restart, sent as call-renegotiate.
async function restartIce() {
  const offer = await app.pc.createOffer({ iceRestart: true });
  await app.pc.setLocalDescription(offer);
  send("call-renegotiate", { callId: app.call.id, to: app.call.peer, description: { type: "offer", sdp: offer.sdp } });
  status("Reconnected; restarting the media path.");
}

function fingerprint(sdp) {
  const line = /^a=fingerprint:.*$/m.exec(sdp || "");
  return line ? line[0].trim() : "";
}

async function onRenegotiate(data) {
  const call = app.call;
  const description = data.description;
  const known = app.pc && app.pc.remoteDescription;
  if (description.type === "offer" && (!app.pc || (known && fingerprint(known.sdp) !== fingerprint(description.sdp)))) {
    // A new certificate: the peer's page was reloaded and its peer connection is new. Chromium
    // would restart DTLS on ours; a new one of ours as well needs no such support.
    app.pendingCandidates = [];
    if (!app.localStream && !(await getMedia(call))) return;
    newPeerConnection();
    setCallState("reconnecting");
    status(`${call.peer} is back; restoring the media.`);
  }
  await app.pc.setRemoteDescription(description);
  if (description.type === "offer") {
    const reply = await app.pc.createAnswer();
    await app.pc.setLocalDescription(reply);
    if (app.call !== call) return;
    send("call-renegotiate", { callId: call.id, to: call.peer, description: { type: "answer", sdp: reply.sdp } });
  }
  await flushCandidates();
}

// `reason` for the record (app.lastEnd), `text` for the page.
function endCall(reason, text = "Call ended: " + reason) {
  if (app.pc) closePeerConnection(app.pc);
  if (app.localStream) app.localStream.getTracks().forEach((track) => track.stop());
  app.pc = null;
  app.localStream = null;
  app.pendingCandidates = [];
  app.call = null;
  app.lastEnd = reason;
  save();
  $("remote").srcObject = null;
  $("local").srcObject = null;
  show("call", false);
  show("incoming", false);
  show("dialer", Boolean(app.session));
  setCallState("idle");
  status(text);
}

$("signin-button").onclick = () => signIn().catch((error) => status("Could not sign in: " + error.message));
$("signout").onclick = signOut;
$("video-call").onclick = () => placeCall("video").catch((error) => status(error.message));
$("voice-call").onclick = () => placeCall("voice").catch((error) => status(error.message));
$("answer").onclick = () => answer().catch((error) => status(error.message));
$("reject").onclick = reject;
$("hangup").onclick = hangUp;
$("missed-dismiss").onclick = dismissMissed;
if (params.get("user")) $("user").value = params.get("user");
if (params.get("callee")) $("callee").value = params.get("callee");

// A reload (or a crash of the tab) keeps this tab's session: sign in again and resume it.
const kept = restore();
if (kept && kept.user && kept.sessionId) {
  app.user = kept.user;
  app.url = kept.url;
  app.sessionId = kept.sessionId;
  $("user").value = kept.user;
  if (kept.call) {
    app.call = { ...kept.call, outbox: [] };
    if (kept.call.role === "caller" || kept.call.answered) showCall("resuming");
  }
  show("signin", false);
  reconnect("The page was reloaded", true);
}
