// Click a column header of the trials table to sort by it (numbers as numbers), again to reverse.
function sortBy(col) {
  const body = document.getElementById("trials").tBodies[0];
  const rows = [...body.rows];
  const dir = body.dataset.col == String(col) && body.dataset.dir == "asc" ? "desc" : "asc";
  body.dataset.col = col;
  body.dataset.dir = dir;
  rows.sort((a, b) => {
    const x = a.cells[col].dataset.key, y = b.cells[col].dataset.key;
    const nx = parseFloat(x), ny = parseFloat(y);
    const order = !isNaN(nx) && !isNaN(ny) ? nx - ny : x.localeCompare(y);
    return dir == "asc" ? order : -order;
  });
  rows.forEach((row) => body.appendChild(row));
}
