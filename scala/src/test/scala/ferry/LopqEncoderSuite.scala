package ferry

import java.io.File

import org.apache.spark.sql.functions.col
import org.scalatest.funsuite.AnyFunSuite

/**
 * LopqEncoder (training on Spark through the workers' lopq_train reduce stage) against
 * ferry.lopq.fit in one Python process on the same seeded vectors.
 */
class LopqEncoderSuite extends AnyFunSuite with SparkSuite {

  private lazy val dir = TestSpark.newDir("lopq-train")
  private lazy val data: String = {
    val path = new File(dir, "vectors.parquet").getAbsolutePath
    py(s"""
      |import sys; sys.path.insert(0, r"${TestSpark.repo}/tests")
      |import numpy as np, pyarrow as pa, pyarrow.parquet as pq
      |from synthetic import mixture
      |from ferry.lopq import fit
      |X = mixture(3000, 16, 12, seed=5).astype(np.float32)
      |pq.write_table(pa.table({"id": np.arange(len(X)), "vector": list(X)}), r"$path", row_group_size=500)
      |np.save(r"$dir/X.npy", X)
      |fit(X.astype(np.float64), V=4, M=4, subquantizer_clusters=16, seed=3).save(r"$dir/inprocess.lopq")
      |fit(X.astype(np.float64), V=4, M=4, subquantizer_clusters=16, seed=3, sample_iters=3).save(
      |    r"$dir/inprocess-sample.lopq")
      |""".stripMargin)
    path
  }

  private def py(script: String): String = TestSpark.runPython(script)


  private def encoder = new LopqEncoder().setNumCoarseClusters(4).setNumSubquantizers(4).setSubquantizerClusters(16)
    .setSeed(3)

  test("training on Spark is ferry.lopq.fit in-process: same parameters, same codes (1 and 3 partitions)") {
    val vectors = spark.read.parquet(data).cache()
    try {
      Seq(1, 3).foreach { parts =>
        val model = encoder.setAggDepth(if (parts == 1) 1 else 2).fit(vectors.repartition(parts))
        assert(model.numCoarseClusters == 4 && model.numSubquantizers == 4 && model.inputDim == 16)
        val file = new File(dir, s"spark-$parts.lopq")
        java.nio.file.Files.write(file.toPath, model.modelBytes)
        // The states travel between passes in float64, as in fit: the same model up to
        // summation order, written to the same float32 file format.
        val report = py(s"""
          |import numpy as np
          |from ferry.lopq import LOPQModel
          |X = np.load(r"$dir/X.npy").astype(np.float64)
          |a, b = LOPQModel.load(r"$dir/inprocess.lopq"), LOPQModel.load(r"${file.getAbsolutePath}")
          |diff = max(float(np.max(np.abs(getattr(a, n) - getattr(b, n)))) for n in ("Cs", "Rs", "mus", "subs"))
          |ca, fa = a.encode(X); cb, fb = b.encode(X)
          |print("largest parameter difference", diff)
          |assert diff <= 1e-6 and np.array_equal(ca, cb) and np.array_equal(fa, fb), diff
          |""".stripMargin)
        info(s"$parts partition(s): ${report.trim.split("\n").last}")
      }
    } finally vectors.unpersist()
  }

  test("sampleIters reaches the workers: Spark equals ferry.lopq.fit(sample_iters=3), which differs from 0") {
    val model = encoder.setSampleIters(3).fit(spark.read.parquet(data).repartition(3))
    val file = new File(dir, "spark-sample.lopq")
    java.nio.file.Files.write(file.toPath, model.modelBytes)
    py(s"""
      |import numpy as np
      |from ferry.lopq import LOPQModel
      |a, b = LOPQModel.load(r"$dir/inprocess-sample.lopq"), LOPQModel.load(r"${file.getAbsolutePath}")
      |plain = LOPQModel.load(r"$dir/inprocess.lopq")
      |diff = max(float(np.max(np.abs(getattr(a, n) - getattr(b, n)))) for n in ("Cs", "Rs", "mus", "subs"))
      |assert diff <= 1e-6, diff
      |assert float(np.max(np.abs(a.subs - plain.subs))) > 1e-3
      |""".stripMargin)
  }

  test("bad params and data fail with typed errors before training") {
    val vectors = spark.read.parquet(data)
    assert(intercept[InvalidParamsException](new LopqEncoder().fit(vectors)).getMessage.contains("numCoarseClusters"))
    val oddM = intercept[InvalidParamsException](encoder.setNumSubquantizers(3).fit(vectors))
    assert(oddM.getMessage.contains("M"), oddM.getMessage)
    val wrongCol = intercept[SchemaMismatchException](encoder.setVectorCol("features").fit(vectors))
    assert(wrongCol.getMessage.contains("'features' does not exist"))
    val ragged = vectors.select(col("id"), org.apache.spark.sql.functions.when(col("id") === 7,
      org.apache.spark.sql.functions.slice(col("vector"), 1, 8)).otherwise(col("vector")).as("vector"))
    assert(intercept[InvalidInputException](encoder.fit(ragged)).getMessage.contains("different lengths"))
  }
}
