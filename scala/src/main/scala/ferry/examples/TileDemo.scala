package ferry.examples

import ferry.TileReconstruct
import org.apache.spark.sql.SparkSession

/**
 * Runs [[ferry.TileReconstruct]] over a ferry tile store and writes the output tiles as Parquet.
 *
 * {{{
 * spark-submit --class ferry.examples.TileDemo --jars ferry-assembly.jar ferry-assembly.jar \
 *     <store.parquet> <output.parquet> --operator convolve2d [--operator-params '{"kernel": [[...]]}']
 *     [--strategy scatter|gather|auto] [--radius R] [--output-dtype operator|int32|...] [--runs N]
 * }}}
 *
 * Prints `FERRY_TILES_RESULT {"run":I,"seconds":S,"reads":R,"outputs":N}` after each of the N
 * runs (default 1) in one session: S covers the job (reading the store's keys, emitting,
 * shuffling, reducing, writing), R the source tiles read. The first run pays the JVM's warm-up
 * (class loading, JIT compilation of Spark, Parquet, gRPC and Arrow); later runs show what a
 * long-lived session gets.
 */
object TileDemo {

  private val Usage = "usage: TileDemo <store.parquet> <output.parquet> --operator NAME " +
    "[--operator-params JSON] [--strategy scatter|gather|auto] [--radius R] [--output-dtype DTYPE] [--runs N]"

  /** The transformer, the store and output paths and the number of runs given by `argv`. */
  def parse(argv: Seq[String]): (TileReconstruct, String, String, Int) = {
    var rest = argv.toList
    val positional = scala.collection.mutable.ArrayBuffer.empty[String]
    val rec = new TileReconstruct()
    var runs = 1
    while (rest.nonEmpty) rest match {
      case "--operator" :: v :: tail => rec.setOperator(v); rest = tail
      case "--operator-params" :: v :: tail => rec.setOperatorParams(v); rest = tail
      case "--strategy" :: v :: tail => rec.setStrategy(v); rest = tail
      case "--radius" :: v :: tail => rec.setRadius(v.toInt); rest = tail
      case "--output-dtype" :: v :: tail => rec.setOutputDtype(v); rest = tail
      case "--runs" :: v :: tail =>
        runs = v.toIntOption.filter(_ >= 1)
          .getOrElse(throw new IllegalArgumentException(s"--runs needs a positive integer, got $v\n$Usage"))
        rest = tail
      case flag :: _ if flag.startsWith("--") => throw new IllegalArgumentException(s"unknown option $flag\n$Usage")
      case v :: tail => positional += v; rest = tail
      case Nil =>
    }
    if (positional.length != 2 || !rec.isDefined(rec.operator)) throw new IllegalArgumentException(Usage)
    (rec, positional(0), positional(1), runs)
  }

  /** Reconstructs and writes; the result line of run number `run`. */
  def run(spark: SparkSession, rec: TileReconstruct, store: String, output: String, run: Int = 1): String = {
    val t0 = System.nanoTime()
    val out = rec.transform(spark.read.parquet(store))
    // Output tiles are multi-MB single values: check the page size on every row and keep no
    // dictionary, so a small heap holds the Parquet writer, and no min/max statistics of the
    // pixels (the writer copies every value to compare it).
    out.write.mode("overwrite").option("parquet.enable.dictionary", "false")
      .option("parquet.column.statistics.enabled#pixels", "false")
      .option("parquet.page.size.row.check.min", 1).option("parquet.page.size.row.check.max", 1)
      .option("parquet.block.size", 16 << 20).option("compression", "none").parquet(output)
    val seconds = (System.nanoTime() - t0) / 1e9
    val outputs = spark.read.parquet(output).count()
    f"""FERRY_TILES_RESULT {"run":$run,"seconds":$seconds%.3f,"reads":${rec.getSourceReads},"outputs":$outputs}"""
  }

  def main(argv: Array[String]): Unit = {
    val (rec, store, output, runs) =
      try parse(argv.toSeq)
      catch {
        case e: IllegalArgumentException =>
          System.err.println(e.getMessage)
          sys.exit(2)
      }
    val spark = SparkSession.builder().appName("ferry TileDemo").getOrCreate()
    try (1 to runs).foreach(i => println(run(spark, rec, store, output, i)))
    finally spark.stop()
  }
}
