// Key [measurement_name, Y, M (0-based), D, h, m, s] of the handler's timestamp.
function (doc) {
  var t;
  if (doc.type !== "measurement" || !doc.timestamp) {
    return;
  }
  t = new Date(doc.timestamp);
  emit(
    [
      doc.measurement_name || "Unknown",
      t.getUTCFullYear(),
      t.getUTCMonth(),
      t.getUTCDate(),
      t.getUTCHours(),
      t.getUTCMinutes(),
      t.getUTCSeconds()
    ],
    doc.log || "No log"
  );
}
