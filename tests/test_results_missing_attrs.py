"""Result objects from a series whose scanner left out optional patient attributes."""

import pydicom
from forward_helpers import make_study_result, write_ct_series

from app.ingest import ingest
from app.results_dicom import build_results


def test_results_build_when_source_lacks_type2_patient_attributes(tmp_path):
    folder = tmp_path / "ct"
    write_ct_series(folder, n_slices=10)
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        for keyword in ("PatientBirthDate", "PatientSex", "ReferringPhysicianName"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(path)
    series = ingest([folder], tmp_path / "work").series[0]
    objects = build_results(series, make_study_result(series))
    assert objects.sr.PatientBirthDate == ""
    assert objects.sr.PatientID == series.patient_id
    assert objects.key_images
