// What the dashboard holds between pages: the session (the token, kept in this tab's
// sessionStorage only, never in a URL; and who it is), the theme, and the live readings
// handed on to whichever page is showing.

const TOKEN_KEY = "sensorhub.token";
const THEME_KEY = "sensorhub.theme";

export const session = {
  token: null,
  /** GET /v1/me: {name, role, token_id, expires_at}. */
  me: null,

  restore() {
    this.token = sessionStorage.getItem(TOKEN_KEY);
    return this.token;
  },

  signIn(token, me) {
    this.token = token;
    this.me = me;
    sessionStorage.setItem(TOKEN_KEY, token);
  },

  signOut() {
    this.token = null;
    this.me = null;
    sessionStorage.removeItem(TOKEN_KEY);
  },

  /** Operators and admins send commands; readers only read (GET /v1/me says which). */
  get canCommand() {
    return this.me?.can_command ?? (this.me?.role === "operator" || this.me?.role === "admin");
  },
};

/** "light" or "dark": the one chosen with the toggle, else the system's. */
export const theme = {
  get current() {
    return localStorage.getItem(THEME_KEY) || (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light");
  },

  apply() {
    const chosen = localStorage.getItem(THEME_KEY);
    if (chosen) document.documentElement.dataset.theme = chosen;
    else delete document.documentElement.dataset.theme;
  },

  toggle() {
    localStorage.setItem(THEME_KEY, this.current === "dark" ? "light" : "dark");
    this.apply();
    window.dispatchEvent(new CustomEvent("themechange"));
  },
};

/**
 * The page being shown, to which live events go: an object with optional `onReadings(event)`
 * ({device_id, readings: [{id, ts, metrics}]}, each reading new to this tab) and `onResync()`.
 */
export const current = { page: null };

/**
 * How long a device may be silent and still count as online: the server's, as GET /v1/devices
 * last said (one device's answer says whether it is online, not for how long it stays so).
 */
export const offline = { afterSecs: 300 };

/** Online: the server said so when it answered, and no longer ago than the threshold. */
export function online(device) {
  const recent = Date.now() - new Date(device.last_seen).getTime() < offline.afterSecs * 1000;
  return device.online !== false && recent;
}
