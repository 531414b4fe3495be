"use strict";
// Shared by every page: the API key (kept in this browser tab's sessionStorage only, never on the
// server) and JSON requests that send it as a bearer token.
const EP = (() => {
  const STORE = "embedpipe.apiKey";
  const keyForm = document.getElementById("key-form");
  const keyInput = document.getElementById("api-key");
  const keyState = document.getElementById("key-state");
  let onKeyChange = () => {};

  function key() {
    try {
      return sessionStorage.getItem(STORE) || "";
    } catch {
      return "";
    }
  }

  function setKey(value) {
    try {
      if (value) sessionStorage.setItem(STORE, value);
      else sessionStorage.removeItem(STORE);
    } catch {
      // Storage can be off (private modes): the key then lasts until the page is left.
    }
    showKeyState();
  }

  function showKeyState(forceOpen = false) {
    if (document.body.dataset.auth === "required" || forceOpen) keyForm.hidden = false;
    keyState.textContent = key()
      ? "A key is set for this tab."
      : "This service needs an API key: it is sent as a bearer token and kept in this browser tab only.";
  }

  function errorMessage(status, data) {
    const detail = data && data.detail;
    let text = "unexpected response from the service";
    if (typeof detail === "string") {
      text = detail;
    } else if (Array.isArray(detail)) {
      // FastAPI's field errors (422): "k: Input should be greater than or equal to 1".
      text = detail
        .map((d) => {
          const where = (d.loc || []).filter((part) => part !== "body").join(".");
          return `${where || "request"}: ${d.msg}`;
        })
        .join("\n");
    }
    const hint = status === 401 ? "\nEnter the service's API key above." : "";
    return `Error ${status}: ${text}${hint}`;
  }

  async function request(path, options = {}) {
    const headers = { Accept: "application/json", ...(options.headers || {}) };
    if (options.body) headers["Content-Type"] = "application/json";
    if (key()) headers.Authorization = `Bearer ${key()}`;
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (err) {
      return { ok: false, status: 0, message: `Could not reach the service: ${err.message}` };
    }
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    if (response.ok && data !== null) return { ok: true, status: response.status, data };
    return { ok: false, status: response.status, message: errorMessage(response.status, data) };
  }

  function showError(element, result) {
    element.textContent = result.message;
    element.hidden = false;
    if (result.status === 401) {
      showKeyState(true);
      keyInput.focus();
    }
  }

  function clearError(element) {
    element.textContent = "";
    element.hidden = true;
  }

  keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    setKey(keyInput.value.trim());
    keyInput.value = "";
    onKeyChange();
  });
  document.getElementById("forget-key").addEventListener("click", () => setKey(""));
  showKeyState();

  return {
    request,
    showError,
    clearError,
    onKeyChange: (fn) => {
      onKeyChange = fn;
    },
  };
})();
