package ferry

import java.io.File

import org.apache.spark.sql.DataFrame
import org.apache.spark.sql.functions.{col, lit, when}
import org.scalatest.funsuite.AnyFunSuite

/**
 * TileReconstruct against the whole-image computation: Python (numpy/scipy, in the venv) writes a
 * seeded tile store and checks the JVM's output tiles against scipy on the whole images.
 */
class TileReconstructSuite extends AnyFunSuite with SparkSuite {

  private lazy val dir = TestSpark.newDir("tiles")
  private lazy val store: String = {
    val path = new File(dir, "store.parquet").getAbsolutePath
    py(s"""
      |import numpy as np
      |from ferry.tiles_store import write_images
      |rng = np.random.default_rng(20261122)
      |images = {"a": rng.standard_normal((37, 53)), "b": rng.standard_normal((40, 40))}
      |np.savez(r"${dir}/images.npz", **images)
      |np.save(r"${dir}/kernel.npy", rng.standard_normal((5, 5)))
      |write_images(r"$path", images, (16, 16))
      |""".stripMargin)
    path
  }

  private def py(script: String): String = TestSpark.runPython(script)

  /** A store of one seeded 45x38x2 int16 image ("i") in 10x12 tiles, values in [low, high); its path. */
  private def intStore(name: String, seed: Int, low: Int, high: Int): String = {
    val path = new File(dir, name).getAbsolutePath
    py(s"""
      |import numpy as np
      |from ferry.tiles_store import write_images
      |rng = np.random.default_rng($seed)
      |write_images(r"$path", {"i": rng.integers($low, $high, size=(45, 38, 2)).astype(np.int16)}, (10, 12))
      |""".stripMargin)
    path
  }


  private def kernel: Array[Array[Double]] = {
    val text = py(s"""import numpy as np; k = np.load(r"$dir/kernel.npy"); print(";".join(",".join(repr(float(v)) for v in r) for r in k))""")
    text.trim.split(";").map(_.split(",").map(_.toDouble))
  }

  /**
   * Writes `out` and checks every image's tiles against `oracle` (a Python expression of img) and,
   * bit for bit, against the in-process job `core` (a Python call of ferry's reconstruct on the
   * store, as ferry.spark.TileReconstruct is tested), so the Scala and PySpark paths agree exactly.
   */
  private def check(out: DataFrame, oracle: String, core: String, what: String): Unit = {
    val path = new File(dir, s"out-${System.nanoTime()}.parquet").getAbsolutePath
    out.write.parquet(path)
    py(s"""
      |import io, numpy as np, pyarrow.parquet as pq, scipy.signal, scipy.ndimage
      |from ferry.stages.tiles import TileKey, reconstruct
      |from ferry.tiles_store import TileStore
      |imgs = np.load(r"$dir/images.npz"); k = np.load(r"$dir/kernel.npy")
      |t = pq.read_table(r"$path").to_pylist()
      |job = reconstruct(TileStore(r"$store"), $core)
      |assert job.reads == 12 + 9 and len(t) == len(job.tiles), ("$what", job.reads, len(t), len(job.tiles))
      |for r in t:
      |    want = job.tiles[TileKey(r["image_id"], r["z"], r["x"], r["y"])]
      |    got = np.load(io.BytesIO(r["pixels"]))
      |    assert got.dtype == want.dtype and np.array_equal(got, want), ("$what: not bit-identical to the core", r["x"], r["y"])
      |for name in imgs.files:
      |    img = imgs[name]
      |    want = $oracle
      |    got = np.full(img.shape, np.nan)
      |    tiles = [r for r in t if r["image_id"] == name]
      |    assert len(tiles) == 3 * 4 if name == "a" else len(tiles) == 9, ("$what", name, len(tiles))
      |    for r in tiles:
      |        a = np.load(io.BytesIO(r["pixels"]))
      |        got[r["y"]:r["y"] + a.shape[0], r["x"]:r["x"] + a.shape[1]] = a
      |    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
      |    assert err <= 1e-9, ("$what", name, err)
      |""".stripMargin)
  }

  test("convolve2d and median equal scipy on the whole images and, bit for bit, the in-process job (1, 3, 7 partitions)") {
    val tiles = spark.read.parquet(store)
    Seq("1", "3", "7").foreach { parts =>
      withConf("spark.sql.shuffle.partitions" -> parts) {
        check(new TileReconstruct().setOperator("convolve2d").setKernel(kernel).transform(tiles),
          "scipy.signal.convolve2d(img, k, mode='same')", "'convolve2d', kernel=k", s"convolve2d scatter, $parts")
        check(new TileReconstruct().setOperator("convolve2d").setKernel(kernel).setStrategy("gather").transform(tiles),
          "scipy.signal.convolve2d(img, k, mode='same')", "'convolve2d', kernel=k, strategy='gather'",
          s"convolve2d gather, $parts")
        check(new TileReconstruct().setOperator("median").setOperatorParams("""{"size": 3}""").transform(tiles),
          "scipy.ndimage.median_filter(img, size=3, mode='constant')", "'median', size=3", s"median, $parts")
      }
    }
  }

  test("threshold_sum on int16 tiles, integer partials summed in the emit or not, equals the in-process job bit for bit") {
    val ints = intStore("int-store.parquet", 7, -32768, 32767)
    val tiles = spark.read.parquet(ints).repartition(3)
    Seq(-1, 0).foreach { mb =>
      val path = new File(dir, s"int-out-$mb.parquet").getAbsolutePath
      new TileReconstruct().setOperator("threshold_sum").setOperatorParams("""{"threshold": 1000}""").setRadius(2)
        .setCombineMb(mb).transform(tiles).write.parquet(path)
      py(s"""
        |import io, numpy as np, pyarrow.parquet as pq
        |from ferry.stages.tiles import TileKey, reconstruct
        |from ferry.tiles_store import TileStore
        |job = reconstruct(TileStore(r"$ints"), "threshold_sum", threshold=1000, radius=2)
        |t = pq.read_table(r"$path").to_pylist()
        |assert len(t) == len(job.tiles) == 20, (len(t), len(job.tiles))
        |for r in t:
        |    got, want = np.load(io.BytesIO(r["pixels"])), job.tiles[TileKey(r["image_id"], r["z"], r["x"], r["y"])]
        |    assert got.dtype == want.dtype == np.int64 and np.array_equal(got, want), ($mb, r["x"], r["y"])
        |""".stripMargin)
    }
  }

  test("images of different tile sizes in one DataFrame, each on its own grid; transform runs no job, AQE or not") {
    val ints = intStore("mixed-int.parquet", 11, -50, 50)
    val both = spark.read.parquet(store).unionByName(spark.read.parquet(ints))
    // With adaptive execution, as without: the emit's shuffle runs in the write, not in transform.
    val runs = Seq("true", "false").map { aqe =>
      withConf("spark.sql.adaptive.enabled" -> aqe) {
        val rec = new TileReconstruct().setOperator("median").setOperatorParams("""{"size": 3}""")
        val (out, during) = jobsDuring(rec.transform(both))
        assert(during.isEmpty && rec.getSourceReads == 0, (aqe, during, rec.getSourceReads))
        val path = new File(dir, s"mixed-out-aqe-$aqe.parquet").getAbsolutePath
        out.write.parquet(path)
        assert(rec.getSourceReads == 12 + 9 + 20, (aqe, rec.getSourceReads))
        path
      }
    }
    val path = runs.head
    assert(spark.read.parquet(runs(1)).except(spark.read.parquet(path)).isEmpty)
    py(s"""
      |import io, numpy as np, pyarrow.parquet as pq
      |from ferry.stages.tiles import TileKey, reconstruct
      |from ferry.tiles_store import TileStore
      |want = {**reconstruct(TileStore(r"$store"), "median", size=3).tiles,
      |        **reconstruct(TileStore(r"$ints"), "median", size=3).tiles}
      |t = pq.read_table(r"$path").to_pylist()
      |assert len(t) == len(want) == 12 + 9 + 20, (len(t), len(want))
      |for r in t:
      |    got, w = np.load(io.BytesIO(r["pixels"])), want[TileKey(r["image_id"], r["z"], r["x"], r["y"])]
      |    assert got.dtype == w.dtype and np.array_equal(got, w), (r["image_id"], r["x"], r["y"])
      |""".stripMargin)
  }

  test("outputDtype casts the output exactly (int32 and int16 equal the int64 job), or fails naming the tile") {
    val ints = intStore("int-store-dtype.parquet", 11, -3000, 3000)
    val tiles = spark.read.parquet(ints).repartition(3)
    def rec = new TileReconstruct().setOperator("threshold_sum").setOperatorParams("""{"threshold": 1000}""")
    val plain = rec
    assert(plain.getOrDefault(plain.outputDtype) == "operator")
    Seq("int32", "int16").foreach { dtype =>
      val path = new File(dir, s"int-out-$dtype.parquet").getAbsolutePath
      rec.setOutputDtype(dtype).transform(tiles).write.parquet(path)
      py(s"""
        |import io, numpy as np, pyarrow.parquet as pq
        |from ferry.stages.tiles import TileKey, reconstruct
        |from ferry.tiles_store import TileStore
        |job = reconstruct(TileStore(r"$ints"), "threshold_sum", threshold=1000)
        |t = pq.read_table(r"$path").to_pylist()
        |assert len(t) == len(job.tiles) == 20, (len(t), len(job.tiles))
        |for r in t:
        |    got, want = np.load(io.BytesIO(r["pixels"])), job.tiles[TileKey(r["image_id"], r["z"], r["x"], r["y"])]
        |    assert got.dtype == np.dtype("$dtype") and want.dtype == np.int64, (got.dtype, want.dtype)
        |    assert np.array_equal(got, want), (r["x"], r["y"])
        |""".stripMargin)
    }
    // Sums of up to 9 values in -3000..1000 do not fit int8: the task fails naming a tile.
    val e = intercept[Exception](rec.setOutputDtype("int8").transform(tiles).collect())
    val f = FerryException.find(e).getOrElse(fail("no FerryException", e))
    assert(f.isInstanceOf[InvalidInputException], f)
    assert(f.getMessage.contains("int8") && f.getMessage.contains("x="), f.getMessage)
    intercept[IllegalArgumentException](rec.setOutputDtype("int12"))
  }

  test("strategy and outputDtype accept exactly the stage contract's choices") {
    val specs = WorkerPool.get(FerryConf.get(spark)).withClient(_.describe(TileReconstruct.Emit)).spec.getParamsList
    def choices(name: String): Set[String] = {
      val p = (0 until specs.size()).map(specs.get).find(_.getName == name).getOrElse(fail(s"no param $name"))
      (0 until p.getChoicesCount).map(p.getChoices).toSet
    }
    assert(TileReconstruct.Strategies.toSet == choices("strategy"))
    assert(TileReconstruct.OutputDtypes.toSet == choices("output_dtype"))
    val rec = new TileReconstruct()
    assert(TileReconstruct.Strategies.forall(rec.strategy.isValid) && !rec.strategy.isValid("nearest"))
    assert(TileReconstruct.OutputDtypes.forall(rec.outputDtype.isValid) && !rec.outputDtype.isValid("int12"))
  }

  test("TileDemo (the benchmark's Scala job) reports one read per source tile and writes every output tile") {
    val (rec, in, out, runs) = ferry.examples.TileDemo.parse(Seq(store, new File(dir, "demo-out").getAbsolutePath,
      "--operator", "median", "--operator-params", """{"size": 3}""", "--strategy", "gather", "--runs", "2"))
    assert(runs == 2)
    for (i <- 1 to runs) {
      // Each run is a new transform: its reads are its own, not the session's total.
      val line = ferry.examples.TileDemo.run(spark, rec, in, out, i)
      val result = Json.decodeObject(line.stripPrefix("FERRY_TILES_RESULT "))
      assert(result.get("run") == i && result.get("reads") == 12 + 9 && result.get("outputs") == 12 + 9, line)
    }
    intercept[IllegalArgumentException](ferry.examples.TileDemo.parse(Seq(store, "out")))
    val badRuns = intercept[IllegalArgumentException](
      ferry.examples.TileDemo.parse(Seq(store, "out", "--operator", "median", "--runs", "0")))
    assert(badRuns.getMessage.contains("--runs needs a positive integer, got 0"))
  }

  test("bad params, columns and tiles fail with typed exceptions naming the problem") {
    val tiles = spark.read.parquet(store)
    assert(intercept[InvalidParamsException](new TileReconstruct().transform(tiles)).getMessage.contains("operator"))
    val noPixels = intercept[SchemaMismatchException](
      new TileReconstruct().setOperator("median").transform(tiles.drop("pixels")))
    assert(noPixels.getMessage.contains("pixels"), noPixels.getMessage)
    val big = Array.fill(17, 17)(1.0)
    // With the tile size given, transform itself refuses the kernel; from the columns, the first task does.
    val tooBig = intercept[InvalidParamsException](
      new TileReconstruct().setOperator("convolve2d").setKernel(big).setTileSize(16, 16).transform(tiles))
    assert(tooBig.getMessage.contains("Kernel 17x17 is larger than the 16x16 tiles"), tooBig.getMessage)
    val inTask = intercept[Exception](
      new TileReconstruct().setOperator("convolve2d").setKernel(big).transform(tiles).collect())
    val p = FerryException.find(inTask).getOrElse(fail("no FerryException", inTask))
    assert(p.isInstanceOf[InvalidParamsException], p)
    assert(p.getMessage.contains("Kernel 17x17 is larger than the 16x16 tiles of image"), p.getMessage)
    val noSize = intercept[InvalidParamsException](
      new TileReconstruct().setOperator("median").transform(tiles.drop("tile_height")))
    assert(noSize.getMessage.contains("setTileSize(height, width)"), noSize.getMessage)
    val corrupt = tiles.withColumn("pixels",
      when(col("x") === 16 && col("y") === 0 && col("image_id") === "a", lit(Array[Byte](1, 2, 3)))
        .otherwise(col("pixels")))
    val e = intercept[Exception](new TileReconstruct().setOperator("median").transform(corrupt).collect())
    val f = FerryException.find(e).getOrElse(fail("no FerryException", e))
    assert(f.isInstanceOf[InvalidInputException], f)
    assert(f.getMessage.contains("x=16") || f.getMessage.contains("16"), f.getMessage)
  }
}
