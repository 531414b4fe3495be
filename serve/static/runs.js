"use strict";
// The runs list and a run's page: fetch the server-rendered fragment (GET /api/runs...) with the key.
(() => {
  const target = document.getElementById("run-data");
  const errorBox = document.getElementById("error");

  async function load() {
    EP.clearError(errorBox);
    target.setAttribute("aria-busy", "true");
    const result = await EP.request(document.body.dataset.source);
    target.removeAttribute("aria-busy");
    if (!result.ok) {
      target.replaceChildren();
      EP.showError(errorBox, result);
      return;
    }
    // Rendered by pipelines/reporting/pages.py, which escapes every string taken from a report.
    target.innerHTML = result.data.html;
  }

  EP.onKeyChange(load);
  load();
})();
