// Keyboard shortcuts of the review page. Served as a file: the page's CSP allows no inline script.
"use strict";
(function () {
  const decision = document.getElementById("decision");
  const queue = document.getElementById("queue");
  const retry = document.getElementById("retry");
  let pending = null; // the action the note or the edit box is for

  function go(id) {
    const link = document.getElementById(id);
    if (link) window.location.href = link.href;
  }

  function hint(text) {
    const el = document.getElementById("hint");
    if (el) el.textContent = text;
  }

  function submit(action) {
    const button = document.getElementById(action);
    if (!decision || !button || decision.dataset.sent) return;
    decision.dataset.sent = "1"; // one decision per page load, even with a held-down key
    decision.requestSubmit(button);
  }

  if (retry) {
    let left = parseInt(retry.dataset.seconds, 10) || 5;
    const countdown = document.getElementById("countdown");
    const tick = setInterval(function () {
      left -= 1;
      if (countdown) countdown.textContent = String(Math.max(left, 0));
      if (left <= 0) {
        clearInterval(tick);
        retry.submit();
      }
    }, 1000);
  }

  function moveSelection(step) {
    const rows = Array.from(queue.querySelectorAll("tbody tr[data-href]"));
    if (!rows.length) return;
    let index = rows.findIndex((r) => r.classList.contains("selected"));
    if (index >= 0) rows[index].classList.remove("selected");
    index = Math.min(rows.length - 1, Math.max(0, index + step));
    rows[index].classList.add("selected");
    rows[index].scrollIntoView({ block: "nearest" });
  }

  document.addEventListener("keydown", function (event) {
    const target = event.target;
    const typing = target.matches && target.matches("input, textarea, select");
    if (typing) {
      if (event.key === "Escape") {
        target.blur();
        pending = null;
        hint("");
      } else if (target.id === "completion" && event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        submit("edit");
      } else if (target.id === "note" && event.key === "Enter") {
        event.preventDefault(); // never the form's first button (accept) by accident
        if (pending) submit(pending);
        else hint("press Esc, then a, e or r");
      }
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (decision) {
      const keys = {
        a: () => submit("accept"),
        e: () => {
          pending = "edit";
          const box = document.getElementById("completion");
          box.focus();
          box.setSelectionRange(box.value.length, box.value.length);
          hint("editing: Ctrl+Enter saves, Esc cancels");
        },
        r: () => {
          pending = "reject";
          document.getElementById("note").focus();
          hint("rejecting: type a note, Enter rejects, Esc cancels");
        },
        j: () => go("next"),
        k: () => go("prev"),
        u: () => go("back"),
      };
      if (keys[event.key]) {
        event.preventDefault();
        keys[event.key]();
      }
    } else if (queue) {
      if (event.key === "j") moveSelection(1);
      else if (event.key === "k") moveSelection(-1);
      else if (event.key === "Enter" || event.key === "o") {
        const row = queue.querySelector("tbody tr.selected");
        if (row) window.location.href = row.dataset.href;
      } else return;
      event.preventDefault();
    }
  });
  document.body.dataset.keys = "ready"; // shortcuts are live (tests wait for this)
})();
