// The console's own script (no framework): live updates from the page's event stream,
// OK/Cancel confirmations, copy buttons, and forms that answer in place.
"use strict";

(function () {
  // ---- live: the server sends {id, html}; the element with that id is replaced ----------
  function startLive(url) {
    var status = document.getElementById("live-status");
    var source = new EventSource(url);
    function say(text, cls) {
      if (!status) return;
      status.textContent = text;
      status.className = "live-status " + (cls || "");
    }
    source.addEventListener("open", function () { say("Live", "live-on"); });
    source.addEventListener("error", function () { say("Reconnecting…", "live-off"); });
    source.addEventListener("swap", function (e) {
      var msg = JSON.parse(e.data);
      var el = document.getElementById(msg.id);
      if (el) el.outerHTML = msg.html;
      document.dispatchEvent(new CustomEvent("console:swapped", { detail: msg.id }));
    });
    source.addEventListener("append", function (e) {
      var msg = JSON.parse(e.data);
      var el = document.getElementById(msg.id);
      if (!el) return;
      var atEnd = el.scrollTop + el.clientHeight >= el.scrollHeight - 4;
      el.insertAdjacentHTML("beforeend", msg.html);
      var max = parseInt(el.dataset.maxLines || "2000", 10);
      while (el.children.length > max) el.removeChild(el.firstElementChild);
      if (atEnd) el.scrollTop = el.scrollHeight;
    });
    source.addEventListener("signed-out", function () { source.close(); location.reload(); });
    source.addEventListener("failed", function (e) {
      source.close();
      say(JSON.parse(e.data).message, "live-off");
    });
    source.addEventListener("done", function () { source.close(); say("Finished", "live-done"); });
  }

  // ---- confirmations: a form with data-confirm asks first ---------------------------------
  var pending = null;
  function setupConfirm() {
    var dialog = document.getElementById("confirm-dialog");
    if (!dialog) return;
    document.addEventListener("submit", function (e) {
      var form = e.target;
      if (!(form instanceof HTMLFormElement) || !form.dataset.confirm) return;
      var flag = form.querySelector("input[name=confirmed]");
      if (flag && flag.value === "yes") return;
      e.preventDefault();
      pending = form;
      document.getElementById("confirm-text").textContent = form.dataset.confirm;
      dialog.showModal();
      document.getElementById("confirm-cancel").focus();
    });
    dialog.addEventListener("close", function () {
      var form = pending;
      pending = null;
      if (!form || dialog.returnValue !== "ok") return;
      if (!form.isConnected) {
        // A live update replaced it while the dialog was open: the same form, new copy.
        var action = form.getAttribute("action");
        form = Array.prototype.find.call(document.querySelectorAll("form[data-confirm]"),
          function (f) { return f.getAttribute("action") === action; });
        if (!form) return;
      }
      var flag = form.querySelector("input[name=confirmed]");
      if (flag) flag.value = "yes";
      form.submit();
    });
  }

  // ---- copy buttons: data-copy="text" -----------------------------------------------------
  document.addEventListener("click", function (e) {
    var button = e.target instanceof Element ? e.target.closest("[data-copy]") : null;
    if (!button) return;
    var text = button.getAttribute("data-copy");
    var done = function () {
      var old = button.textContent;
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = old; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () {});
    } else {
      var area = document.createElement("textarea");
      area.value = text;
      document.body.appendChild(area);
      area.select();
      try { document.execCommand("copy"); done(); } catch (err) { /* nothing to copy into */ }
      document.body.removeChild(area);
    }
  });

  // ---- forms with data-target answer in place: the response HTML replaces that element ----
  document.addEventListener("submit", function (e) {
    var form = e.target;
    if (!(form instanceof HTMLFormElement) || !form.dataset.target || e.defaultPrevented) return;
    e.preventDefault();
    var target = document.getElementById(form.dataset.target);
    var button = form.querySelector("button[type=submit]");
    if (button) button.disabled = true;
    var body = new FormData(form);
    body.set("target", form.dataset.target);
    fetch(form.action, {
      method: "POST",
      body: body,
      headers: { "X-Requested-With": "fetch" },
      credentials: "same-origin",
    }).then(function (r) {
      // Signed out meanwhile: the sign-in page itself, not a piece of it.
      if (r.redirected) { location.href = r.url; return null; }
      if (!r.ok) {
        if (target) target.textContent = "Refused (HTTP " + r.status + "): reload the page and try again.";
        return null;
      }
      return r.text();
    }).then(function (html) {
      if (html !== null && target) target.outerHTML = html;
    }).catch(function (err) {
      if (target) target.textContent = "The console could not be reached: " + err;
    }).finally(function () { if (button) button.disabled = false; });
  });

  // ---- forms with data-plan ask the server what the change will do, as they change -----
  // (a POST with the form as it is, CSRF token included; the answer is the plan's HTML,
  // with each refused field's message in a hidden [data-field-error] for beside that field)
  function showFieldErrors(form, out) {
    var given = {};
    out.querySelectorAll("[data-field-error]").forEach(function (el) {
      given[el.getAttribute("data-field-error")] = el.textContent;
    });
    form.querySelectorAll(".field-error[data-for]").forEach(function (el) {
      var name = el.getAttribute("data-for");
      var text = given[name] || "";
      el.textContent = text;
      var input = document.getElementById(name);
      if (!input) return;
      if (text) input.setAttribute("aria-invalid", "true");
      else input.removeAttribute("aria-invalid");
    });
    var anyway = form.querySelector("button[name=wait_for_capacity]");
    if (anyway) anyway.hidden = !out.querySelector("[data-no-room]");
  }

  function setupPlans() {
    document.querySelectorAll("form[data-plan]").forEach(function (form) {
      var out = document.getElementById(form.dataset.planTarget);
      var timer = null;
      var asked = 0;
      function ask() {
        var mine = ++asked;
        var body = new FormData(form);
        form.querySelectorAll("[data-plan-skip]").forEach(function (el) { body.delete(el.name); });
        fetch(form.dataset.plan, {
          method: "POST",
          body: body,
          headers: { "X-Requested-With": "fetch" },
          credentials: "same-origin",
        }).then(function (r) {
          // Signed out meanwhile: the page itself goes to sign-in (and back here after).
          if (r.redirected) { location.reload(); return null; }
          if (!r.ok) throw new Error("HTTP " + r.status + ": reload the page");
          return r.text();
        }).then(function (html) {
          if (html === null || mine !== asked || !out) return;
          out.innerHTML = html;
          showFieldErrors(form, out);
        }).catch(function (err) {
          if (mine === asked && out) out.textContent = "The plan could not be asked for: " + err.message;
        });
      }
      form.addEventListener("input", function () {
        clearTimeout(timer);
        timer = setTimeout(ask, 150);
      });
      // The page came with the plan of its fields; a page restored from the history may
      // have other values in them.
      window.addEventListener("pageshow", function (e) { if (e.persisted) ask(); });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (document.body.dataset.live) startLive(document.body.dataset.live);
    setupConfirm();
    setupPlans();
  });
})();
