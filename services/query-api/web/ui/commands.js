// A device's commands, for operators and admins (readers are never shown this): send `led`
// on or off, or any command by name with JSON args; follow each one sent until it is finished
// (GET /v1/commands/{id} every second: a command's status only moves forward, and a finished
// one never changes again); the device's recent commands; cancel one not yet finished.

import { api } from "./api.js";
import { fill, formatTime, h } from "./dom.js";

const FINAL = new Set(["succeeded", "failed", "expired", "cancelled"]);
const RECENT = 10;
const FOLLOW_EVERY_MS = 1000;

export function mount(section, deviceId) {
  const followed = new Map(); // command id → timer
  const rows = new Map(); // command id → <tr>
  let stopped = false;

  const message = h("p", { class: "muted", role: "status", id: "command-message" });
  const nameInput = h("input", { id: "command-name", value: "led", required: true, pattern: "[A-Za-z0-9._\\-]{1,64}", autocomplete: "off", spellcheck: "false" });
  const argsInput = h("textarea", { id: "command-args", rows: 2, spellcheck: "false" }, '{"on": true}');
  const ttlInput = h("input", { id: "command-ttl", type: "number", min: 1, value: 300, inputmode: "numeric" });
  const body = h("tbody");

  fill(section,
    h("h2", { id: "commands-title" }, "Commands"),
    h("div", { class: "led-buttons" },
      h("button", { type: "button", id: "led-on", onclick: () => send("led", { on: true }) }, "LED on"),
      h("button", { type: "button", id: "led-off", onclick: () => send("led", { on: false }) }, "LED off")),
    h("details", { class: "any-command" },
      h("summary", {}, "Another command"),
      h("form", { class: "command-form", onsubmit: sendForm },
        h("label", { for: "command-name" }, "Name"), nameInput,
        h("label", { for: "command-args" }, "Arguments (a JSON object)"), argsInput,
        h("label", { for: "command-ttl" }, "Wait for the device at most (seconds)"), ttlInput,
        h("button", { type: "submit" }, "Send"))),
    message,
    h("div", { class: "table-wrap" },
      h("table", { class: "commands-table", id: "commands-table" },
        h("caption", { class: "visually-hidden" }, "Recent commands, newest first"),
        h("thead", {}, h("tr", {},
          h("th", { scope: "col" }, "Sent"),
          h("th", { scope: "col" }, "Command"),
          h("th", { scope: "col" }, "Status"),
          h("th", { scope: "col" }, "Result"),
          h("th", { scope: "col" }, h("span", { class: "visually-hidden" }, "Actions")))),
        body)),
  );

  function sendForm(event) {
    event.preventDefault();
    let args;
    try {
      args = JSON.parse(argsInput.value.trim() || "{}");
    } catch (error) {
      message.textContent = `The arguments are not JSON: ${error.message}`;
      argsInput.focus();
      return;
    }
    if (typeof args !== "object" || args === null || Array.isArray(args)) {
      message.textContent = "The arguments must be a JSON object, such as {\"on\": true}.";
      argsInput.focus();
      return;
    }
    send(nameInput.value.trim(), args, Number(ttlInput.value) || undefined);
  }

  async function send(name, args, ttl_s) {
    message.textContent = `Sending ${name}…`;
    try {
      const command = await api.issueCommand(deviceId, { name, args, ttl_s });
      message.textContent = `${name} sent: ${command.status}.`;
      show(command, true);
      follow(command.id);
    } catch (error) {
      message.textContent = `Not sent: ${error.message}`;
    }
  }

  function show(command, first = false) {
    const row = rows.get(command.id) || h("tr", { "data-command": command.id });
    const cancellable = !FINAL.has(command.status);
    fill(row,
      h("td", { "data-label": "Sent" }, h("time", { datetime: command.created_at }, formatTime(command.created_at))),
      h("td", { "data-label": "Command" }, h("code", {}, `${command.name} ${JSON.stringify(command.args)}`)),
      h("td", { "data-label": "Status" }, h("span", { class: `status status-${command.status}`, "data-status": command.status }, command.status)),
      h("td", { "data-label": "Result" }, command.result === null || command.result === undefined ? "–" : h("code", {}, JSON.stringify(command.result))),
      h("td", {}, cancellable ? h("button", { type: "button", class: "ghost", onclick: () => cancel(command.id) }, "Cancel") : ""),
    );
    if (!rows.has(command.id)) {
      rows.set(command.id, row);
      if (first) body.prepend(row);
      else body.append(row);
    }
  }

  /** Asks for the command every second until it is finished. */
  function follow(id) {
    if (followed.has(id) || stopped) return;
    const ask = async () => {
      try {
        const command = await api.command(id);
        const before = rows.get(id)?.querySelector("[data-status]")?.dataset.status;
        show(command);
        if (before !== command.status) message.textContent = `${command.name}: ${command.status}.`;
        if (FINAL.has(command.status)) return followed.delete(id);
      } catch {
        // asked again at the next tick
      }
      if (!stopped) followed.set(id, setTimeout(ask, FOLLOW_EVERY_MS));
    };
    followed.set(id, setTimeout(ask, FOLLOW_EVERY_MS));
  }

  async function cancel(id) {
    try {
      show(await api.cancelCommand(id));
      message.textContent = "Cancelled.";
    } catch (error) {
      message.textContent = `Not cancelled: ${error.message}`;
    }
  }

  async function loadRecent() {
    try {
      const { commands } = await api.deviceCommands(deviceId, { limit: RECENT });
      for (const command of commands) {
        show(command);
        if (!FINAL.has(command.status)) follow(command.id);
      }
      if (!commands.length) message.textContent = "No commands sent to this device yet.";
    } catch (error) {
      message.textContent = error.status === 404 ? "This device is not registered: it cannot be sent commands." : `Could not load the commands: ${error.message}`;
    }
  }

  loadRecent();
  return {
    unmount() {
      stopped = true;
      for (const timer of followed.values()) clearTimeout(timer);
    },
  };
}
