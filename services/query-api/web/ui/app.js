// The dashboard's entry: signing in and out, the live feed, and the pages by the URL's fragment
// (#/ the fleet, #/devices/<id> a device). The token never goes into a URL.

import { api, setToken, onUnauthorized } from "./api.js";
import { session, theme, current } from "./state.js";
import { LiveFeed } from "./live.js";
import { fill, h } from "./dom.js";
import * as fleet from "./fleet.js";

const $ = (id) => document.getElementById(id);
const view = $("view");

const live = new LiveFeed({
  onReadings: (event) => current.page?.onReadings?.(event),
  onResync: () => current.page?.onResync?.(),
  onState: showLiveState,
});

/** The longest the first page waits for the live stream to open. */
const OPEN_WAIT_MS = 1000;

const LIVE_STATES = {
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Reconnecting…",
  unavailable: "No live updates",
  stopped: "",
};

function showLiveState(state) {
  const el = $("live-state");
  el.dataset.state = state;
  el.textContent = LIVE_STATES[state] ?? "";
  el.hidden = !el.textContent;
}

/** The token's identity from GET /v1/me, or an ApiError. */
async function whoIs(token) {
  setToken(token);
  return api.me();
}

function showSignIn(message) {
  live.stop();
  current.page?.unmount?.();
  current.page = null;
  view.replaceChildren();
  $("nav").hidden = true;
  $("who").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  const error = $("sign-in-error");
  error.textContent = message || "";
  error.hidden = !message;
  $("token").setAttribute("aria-invalid", message ? "true" : "false");
  $("token").focus();
}

function showApp() {
  const { me } = session;
  $("sign-in").hidden = true;
  $("nav").hidden = false;
  fill($("who"), h("span", { class: "who-name" }, me.name || "app"), " ", h("span", { class: "role" }, me.role));
  $("who").hidden = false;
  $("sign-out").hidden = false;
  // the page's data is read once the live stream is open, so nothing stored in between is
  // missed; a stream slow to open does not hold the page back for long
  Promise.race([live.start(), new Promise((resolve) => setTimeout(resolve, OPEN_WAIT_MS))]).then(route);
}

function refusal(error) {
  if (error.status === 401) return `This token was refused: ${error.message}`;
  if (error.status === 403) return `This token cannot use the dashboard: ${error.message}`;
  if (error.status === 429) return "Too many attempts: wait a little and try again.";
  return `Could not sign in: ${error.message}`;
}

async function signIn(event) {
  event.preventDefault();
  const input = $("token");
  const token = input.value.trim();
  if (!token) return showSignIn("Paste a token first.");
  const button = event.submitter || $("sign-in-form").querySelector("button");
  button.disabled = true;
  try {
    const me = await whoIs(token);
    input.value = "";
    session.signIn(token, me);
    showApp();
    $("main").focus(); // the sign-in form is gone: the reader goes on with the page
  } catch (error) {
    setToken(null);
    showSignIn(refusal(error));
  } finally {
    button.disabled = false;
  }
}

function signOut() {
  session.signOut();
  setToken(null);
  history.replaceState(null, "", "#/");
  showSignIn();
}

let routing = 0;

/** Shows the page the fragment names. */
async function route() {
  if (!session.me) return;
  const hash = location.hash || "#/";
  if (!hash.startsWith("#/")) return; // an in-page link (#main)
  const turn = ++routing;
  current.page?.unmount?.();
  current.page = null;
  view.replaceChildren();
  const [path, search] = hash.slice(1).split("?");
  const params = new URLSearchParams(search || "");
  const device = path.match(/^\/devices\/([^/]+)$/);
  let page;
  if (device) {
    const { mount } = await import("./device.js");
    if (turn !== routing) return; // another page was asked for meanwhile
    page = mount(view, decodeURIComponent(device[1]), params);
  } else {
    page = fleet.mount(view, params);
  }
  current.page = page;
  document.querySelectorAll("#nav a").forEach((a) => a.toggleAttribute("aria-current", a.getAttribute("href") === hash));
}

function applyTheme() {
  theme.apply();
  const dark = theme.current === "dark";
  const toggle = $("theme-toggle");
  // a toggle button: its name stays, its pressed state says which theme is on
  toggle.setAttribute("aria-pressed", String(dark));
}

async function start() {
  applyTheme();
  $("theme-toggle").addEventListener("click", () => {
    theme.toggle();
    applyTheme();
  });
  matchMedia("(prefers-color-scheme: dark)").addEventListener("change", applyTheme);
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  window.addEventListener("hashchange", route);
  onUnauthorized((error) => {
    session.signOut();
    setToken(null);
    showSignIn(`Signed out: ${error.message}`);
  });

  const saved = session.restore();
  if (!saved) return showSignIn();
  try {
    session.signIn(saved, await whoIs(saved));
    showApp();
  } catch (error) {
    session.signOut();
    setToken(null);
    showSignIn(error.status === 401 ? `Signed out: ${error.message}` : refusal(error));
  }
}

start();
