-- Orthanc auto-routing for `brainmets serve`: every CT instance Orthanc stores is sent on to
-- the modality named "brainmets" in Orthanc's DicomModalities, e.g.
--   "DicomModalities": { "brainmets": [ "BRAINMETS", "127.0.0.1", 11112 ] }
-- and loaded with "LuaScripts": [ "/path/to/route-ct-to-brainmets.lua" ].
--
-- Only CT is routed: the results brainmets sends back (an SR and secondary captures, modality
-- SR and OT) are stored in the study but never sent to brainmets again. Orthanc keeps the CT
-- (no Delete), and brainmets scores a study once no instance arrived for --stable-seconds.

function OnStoredInstance(instanceId, tags, metadata, origin)
  if tags['Modality'] == 'CT' then
    SendToModality(instanceId, 'brainmets')
  end
end
