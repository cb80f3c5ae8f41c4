// Key [Y, M (0-based), D, h, m, s, measurement_name]: measurements in time order.
function (doc) {
  var t;
  if (doc.type !== "measurement" || !doc.timestamp) {
    return;
  }
  t = new Date(doc.timestamp);
  emit(
    [
      t.getUTCFullYear(),
      t.getUTCMonth(),
      t.getUTCDate(),
      t.getUTCHours(),
      t.getUTCMinutes(),
      t.getUTCSeconds(),
      doc.measurement_name || "Unknown"
    ],
    doc.log || "No log"
  );
}
