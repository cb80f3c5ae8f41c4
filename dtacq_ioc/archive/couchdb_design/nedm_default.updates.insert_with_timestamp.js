// POST .../_update/insert_with_timestamp        creates a document (server uuid)
// PUT  .../_update/insert_with_timestamp/<id>   creates or merges into <id>
// ?overwrite=true first drops the keys the body does not carry.
function (doc, req) {
  var _ref, key, msg;
  _ref = JSON.parse(req.body);
  if (doc === null) {
    doc = { _id: req.id || _ref._id || req.uuid };
    msg = "inserted";
  } else {
    msg = "updated";
    // CouchDB passes query values as strings, pouchdb-server parses them as JSON.
    if (req.query.overwrite === "true" || req.query.overwrite === true) {
      for (key in doc) {
        if (key.charAt(0) !== "_" && !_ref.hasOwnProperty(key)) {
          delete doc[key];
        }
      }
    }
  }
  for (key in _ref) {
    if (key !== "_id" && key !== "_rev") {
      doc[key] = _ref[key];
    }
  }
  if (!doc.created_by && req.userCtx && req.userCtx.name) {
    doc.created_by = req.userCtx.name;
  }
  doc.timestamp = new Date().toUTCString();
  return [doc, JSON.stringify({ ok: true, id: doc._id, msg: msg })];
}
