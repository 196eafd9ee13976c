// Draws the figures the page carries (Plotly JSON built by qe_assets/web/dashboards.py).
// Each section gets data-state="rendered" or "empty"; the body gets data-charts-rendered when
// every plot has been drawn, so a browser test knows when to look.
(function () {
  "use strict";
  const payload = JSON.parse(document.getElementById("figures").textContent);
  const main = document.getElementById("charts");
  const config = { displaylogo: false, responsive: true };
  const drawn = [];
  for (const chart of payload.charts) {
    const section = document.createElement("section");
    section.id = chart.id;
    const heading = document.createElement("h2");
    heading.textContent = chart.heading;
    section.appendChild(heading);
    if (chart.note) {
      const note = document.createElement("p");
      note.className = "note";
      note.textContent = chart.note;
      section.appendChild(note);
    }
    const body = document.createElement("div");
    section.appendChild(body);
    main.appendChild(section);
    if (chart.table) {
      // Text only (textContent): model names and reasons come from the store.
      const table = document.createElement("table");
      table.className = "timeline";
      const head = table.createTHead().insertRow();
      for (const name of chart.table.columns) {
        const th = document.createElement("th");
        th.textContent = name;
        head.appendChild(th);
      }
      const rows = table.createTBody();
      chart.table.rows.forEach(function (cells, i) {
        const row = rows.insertRow();
        row.dataset.status = chart.table.status[i];
        for (const value of cells) row.insertCell().textContent = value;
      });
      body.appendChild(table);
      section.dataset.state = "rendered";
    } else if (chart.figure) {
      body.className = "chart";
      drawn.push(
        Plotly.newPlot(body, chart.figure.data, chart.figure.layout, config).then(function () {
          section.dataset.state = "rendered";
        })
      );
    } else {
      body.className = "empty";
      body.textContent = chart.empty;
      section.dataset.state = "empty";
    }
  }
  Promise.all(drawn).then(function () {
    document.body.dataset.chartsRendered = String(drawn.length);
    if (location.hash) {
      const target = document.getElementById(location.hash.slice(1));
      if (target) target.scrollIntoView();
    }
  });
})();
