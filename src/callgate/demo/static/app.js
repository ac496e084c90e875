// The callgate browser demo: the browser's WebSocket and RTCPeerConnection, nothing else.
// docs/protocol.md is the contract this page speaks.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
// In a sandbox without networks, the test runs both pages on one machine: keep ICE on loopback.
const loopbackOnly = params.get("loopback") === "1";

const REASONS = {
  unavailable: "they are not online",
  busy: "they are in another call",
  glare: "you both called at once; their call wins",
  timeout: "nobody answered",
  cancelled: "the caller hung up",
  answered_elsewhere: "answered on another of your devices",
  rejected_elsewhere: "declined on another of your devices",
  peer_disconnected: "the other side lost its connection",
  revoked: "access was revoked",
  server_shutdown: "the server is restarting",
  rejected: "they declined",
};

const app = {
  ws: null,
  session: null,
  user: null,
  iceServers: [],
  call: null, // {id, peer, media, role: "caller"|"callee", state, offer?}
  pc: null,
  localStream: null,
  pendingCandidates: [],
  nextRef: 1,
};
window.callgate = app; // for the end-to-end test and for curious developers

function status(text) {
  $("status").textContent = text;
}

function show(section, visible) {
  $(section).hidden = !visible;
}

function setConnection(text, on) {
  $("connection").textContent = text;
  $("connection").className = "pill " + (on ? "on" : "off");
}

function setCallState(state) {
  if (app.call) app.call.state = state;
  $("call-state").textContent = state;
  $("call-state").className = "pill" + (state === "connected" ? " on" : "");
}

function send(event, data) {
  app.ws.send(JSON.stringify({ event, data, ref: app.nextRef++ }));
}

async function fetchToken(user) {
  const response = await fetch("/token?user=" + encodeURIComponent(user));
  if (!response.ok) throw new Error((await response.json()).message);
  return (await response.json()).token;
}

async function signIn() {
  const user = $("user").value.trim();
  if (!user) return status("Type a name first.");
  app.user = user;
  const config = await (await fetch("/config.json")).json();
  await openSocket(config.url, await fetchToken(user), null);
}

async function openSocket(url, token, resume) {
  setConnection("connecting", false);
  const ws = new WebSocket(url);
  app.ws = ws;
  ws.onopen = () => ws.send(JSON.stringify({ event: "auth", data: resume ? { token, resume } : { token } }));
  ws.onmessage = (message) => onMessage(JSON.parse(message.data));
  ws.onclose = (closed) => onClose(closed, url);
}

function onClose(closed, url) {
  setConnection("disconnected", false);
  if (closed.code === 4003 || closed.code === 4029) {
    status(`Disconnected: ${closed.reason} (${closed.code}).`);
    return;
  }
  // Anything else (network change, expired token, restart): come back with a fresh token and
  // resume the session, so a call in progress survives.
  status(`Connection lost (${closed.code} ${closed.reason}); reconnecting...`);
  setTimeout(async () => {
    try {
      await openSocket(url, await fetchToken(app.user), app.session && app.session.sessionId);
    } catch (error) {
      status("Could not reconnect: " + error.message);
    }
  }, 500);
}

async function onMessage({ event, data }) {
  switch (event) {
    case "session": {
      const resumed = data.resumed === true;
      app.session = data;
      app.iceServers = data.iceServers;
      setConnection("online as " + data.user, true);
      $("me").textContent = data.user;
      show("signin", false);
      show("dialer", !app.call);
      if (resumed && app.call && app.pc) restartIce();
      else if (data.resumed === false && app.call) endCall("the call could not be resumed");
      break;
    }
    case "token-expiring":
      send("auth", { token: await fetchToken(app.user) });
      break;
    case "call-request":
      return onIncoming(data);
    case "call-answer":
      setCallState("connecting");
      await app.pc.setRemoteDescription(data.answer);
      await flushCandidates();
      break;
    case "call-reject":
      return endCall(REASONS[data.reason] || REASONS.rejected);
    case "call-end":
      return endCall(data.reason ? REASONS[data.reason] || data.reason : data.from + " hung up");
    case "ice-candidate":
      // The caller trickles candidates while we still ring: keep them until we answer.
      if (!app.pc || !app.pc.remoteDescription) {
        if (app.call) app.pendingCandidates.push(data.candidate);
        return;
      }
      await addCandidate(data.candidate);
      break;
    case "call-renegotiate":
      return onRenegotiate(data);
    case "error":
      status(`Refused: ${data.message} (${data.code})`);
      break;
  }
}

async function getMedia(media) {
  const constraints = { audio: true, video: media === "video" };
  app.localStream = await navigator.mediaDevices.getUserMedia(constraints);
  $("local").srcObject = app.localStream;
}

function newPeerConnection() {
  const pc = new RTCPeerConnection({ iceServers: app.iceServers });
  app.pc = pc;
  pc.onicecandidate = ({ candidate }) => {
    if (!app.call) return;
    if (candidate && loopbackOnly && !candidate.candidate.includes(" 127.0.0.1 ")) return;
    send("ice-candidate", { callId: app.call.id, to: app.call.peer, candidate: candidate && candidate.toJSON() });
  };
  pc.ontrack = ({ streams }) => {
    $("remote").srcObject = streams[0];
  };
  pc.onconnectionstatechange = () => {
    if (!app.call) return;
    const state = pc.connectionState;
    setCallState(state === "connected" ? "connected" : state);
    if (state === "connected") status("Connected.");
  };
  for (const track of app.localStream.getTracks()) pc.addTrack(track, app.localStream);
  return pc;
}

async function placeCall(media) {
  const peer = $("callee").value.trim();
  if (!peer) return status("Whom do you want to call?");
  await getMedia(media);
  app.call = { id: crypto.randomUUID(), peer, media, role: "caller", state: "calling" };
  const pc = newPeerConnection();
  const offer = await pc.createOffer();
  await pc.setLocalDescription(offer);
  send("call-request", {
    id: app.call.id, from: app.user, to: peer, type: media,
    offer: { type: "offer", sdp: offer.sdp }, timestamp: Date.now(),
  });
  $("peer").textContent = peer;
  setCallState("ringing");
  show("dialer", false);
  show("call", true);
  status(`Calling ${peer}...`);
}

function onIncoming(data) {
  if (app.call) return; // the server already refused a second call: we are busy
  app.call = { id: data.id, peer: data.from, media: data.type, role: "callee", state: "ringing", offer: data.offer };
  $("caller").textContent = data.from;
  $("incoming-media").textContent = data.type;
  show("dialer", false);
  show("incoming", true);
  status(`${data.from} is calling.`);
}

async function answer() {
  const call = app.call;
  await getMedia(call.media);
  const pc = newPeerConnection();
  await pc.setRemoteDescription(call.offer);
  await flushCandidates();
  const reply = await pc.createAnswer();
  await pc.setLocalDescription(reply);
  send("call-answer", { callId: call.id, to: call.peer, answer: { type: "answer", sdp: reply.sdp } });
  $("peer").textContent = call.peer;
  show("incoming", false);
  show("call", true);
  setCallState("connecting");
}

function reject() {
  send("call-reject", { callId: app.call.id, to: app.call.peer });
  endCall("You declined.");
}

function hangUp() {
  if (app.call) send("call-end", { callId: app.call.id, to: app.call.peer });
  endCall("You hung up.");
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

// After a resume the media path may be gone: an ICE restart, sent as call-renegotiate.
async function restartIce() {
  const offer = await app.pc.createOffer({ iceRestart: true });
  await app.pc.setLocalDescription(offer);
  send("call-renegotiate", { callId: app.call.id, to: app.call.peer, description: { type: "offer", sdp: offer.sdp } });
  status("Reconnected; restarting the media path.");
}

async function onRenegotiate(data) {
  const description = data.description;
  await app.pc.setRemoteDescription(description);
  if (description.type === "offer") {
    const reply = await app.pc.createAnswer();
    await app.pc.setLocalDescription(reply);
    send("call-renegotiate", { callId: app.call.id, to: app.call.peer, description: { type: "answer", sdp: reply.sdp } });
  }
}

function endCall(reason) {
  if (app.pc) app.pc.close();
  if (app.localStream) app.localStream.getTracks().forEach((track) => track.stop());
  app.pc = null;
  app.localStream = null;
  app.pendingCandidates = [];
  app.call = null;
  app.lastEnd = reason;
  $("remote").srcObject = null;
  $("local").srcObject = null;
  show("call", false);
  show("incoming", false);
  show("dialer", Boolean(app.session));
  setCallState("idle");
  status("Call ended: " + reason);
}

$("signin-button").onclick = () => signIn().catch((error) => status("Could not sign in: " + error.message));
$("video-call").onclick = () => placeCall("video").catch((error) => status(error.message));
$("voice-call").onclick = () => placeCall("voice").catch((error) => status(error.message));
$("answer").onclick = () => answer().catch((error) => status(error.message));
$("reject").onclick = reject;
$("hangup").onclick = hangUp;
if (params.get("user")) $("user").value = params.get("user");
if (params.get("callee")) $("callee").value = params.get("callee");
